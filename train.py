"""Train a dense baseline, or fine-tune a found policy.

  python train.py --config configs/<name>.py --workdir DIR             # dense baseline
  python train.py --config configs/<name>.py --workdir DIR --finetune  # fine-tune DIR/policy.json

--config: an ml_collections config file (configs/); any entry can be overridden, e.g.
  --config.train.epochs=3 --config.data.data_dir=/data/tfds
--workdir: where checkpoints (orbax), metrics (JSON lines, TensorBoard) and the summary go. Running the
  same command again resumes from the last checkpoint in it.
--finetune: DIR is a run directory whose method left its policy.json (search.py): run the original's fine-tuning stages
  (full precision with masks; activations quantized; weights and activations quantized; epochs and
  schedules from config.finetune), each from the previous stage's best validation checkpoint, then export
  the slimmed, integer-coded model to DIR/model_export.npz.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # TensorFlow's C++ logs off (before any TF import) unless asked

from picpq_jax import hosts, xla_setup  # noqa: E402

xla_setup.configure_cpu()
hosts.start()  # many processes, when the environment asks for them (picpq_jax/hosts.py)

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from picpq_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_bool('finetune', False, 'Fine-tune the policy of a search workdir instead of training a baseline.')
flags.mark_flags_as_required(['config', 'workdir'])


@cli.report_user_errors
def main(argv):
  del argv
  config = FLAGS.config
  from picpq_jax import fingerprints, pipeline  # pylint: disable=g-import-not-at-top
  if FLAGS.finetune:
    summary = pipeline.finetune_policy(config, FLAGS.workdir)
  else:
    pipeline.check_config(config)
    fingerprints.prepare(FLAGS.workdir, config, last='baseline')
    summary = pipeline.train_baseline(config, FLAGS.workdir)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
