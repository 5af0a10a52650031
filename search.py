"""Run a compression method end to end: `python search.py --config configs/<name>.py --workdir DIR`.

Stages (each saved in the workdir; running the same command again resumes where it stopped): train or load
the dense baseline; the method of config.method.name (picpq: filter properties, the evolutionary (a, b)
search, the final masks and bits; uniform; codeq: training with learned dead zones and bits), which leaves
policy.json; the fine-tuning stages (full precision, activations quantized, weights and activations quantized;
skip them with --config.finetune.enabled=False); the export; and the report (summary.md, summary.json, plots).

--config: an ml_collections config file (configs/); override any entry, e.g. --config.search.population=32
--workdir: where every stage's results, checkpoints, metrics and plots go.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # TensorFlow's C++ logs off (before any TF import) unless asked

from picpq_jax import hosts, xla_setup  # noqa: E402

xla_setup.configure_cpu()
hosts.start()  # many processes, when the environment asks for them (picpq_jax/hosts.py)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from picpq_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for every stage\'s results, checkpoints and plots.')
flags.mark_flags_as_required(['config', 'workdir'])


@cli.report_user_errors
def main(argv):
  del argv
  config = FLAGS.config
  from picpq_jax import pipeline  # pylint: disable=g-import-not-at-top
  result = pipeline.compress(config, FLAGS.workdir)
  print(result['table'])
  s = result['summary']
  if s['compressed_test_accuracy'] is not None:
    print(f'test accuracy: baseline {100 * s["baseline_test_accuracy"]:.2f} %, compressed '
          f'{100 * s["compressed_test_accuracy"]:.2f} % (drop {100 * s["accuracy_drop"]:.2f} points) at '
          f'{s["bops_compression"]:.2f}x fewer BOPs')
  print(f'results in {FLAGS.workdir}: summary.md, summary.json, policy.json, layers.png (and the method\'s own '
        'files, e.g. search_history.npz and search_loss.png for picpq)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
