"""Every compression method on one baseline: `python compare.py --config configs/compare_mnist5k.py --workdir DIR`.

Trains (or reuses) one dense baseline, runs PIC-PQ's search once, then every (method, setting) of the config's
`compare.rows` in its own resumable run directory with the same fine-tuning, and writes DIR/comparison.md,
DIR/comparison.json and DIR/pareto.png (picpq_jax/compare.py). Running the same command again continues where
it stopped; a setting that fails is reported in the table and the others go on.

--config: a comparison config (configs/compare_*.py); override any entry, e.g. --config.compare.seeds=3
--workdir: the comparison's directory.
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
config_flags.DEFINE_config_file('config', None, 'Comparison config file (configs/compare_*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory of the comparison: the baseline, one run per setting, the table.')
flags.mark_flags_as_required(['config', 'workdir'])


@cli.report_user_errors
def main(argv):
  del argv
  from picpq_jax import compare, report  # pylint: disable=g-import-not-at-top
  result = compare.compare(FLAGS.config, FLAGS.workdir)
  print(report.comparison_markdown(result))
  print(f'results in {FLAGS.workdir}: comparison.md, comparison.json, pareto.png')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
