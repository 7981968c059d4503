r"""Train and evaluate a Mixer: flags and process setup only; the loop is train.py.

  python -m mixer_jax.main --config=configs/default.py --workdir=/tmp/mixer_digits
  python -m mixer_jax.main --config=configs/imagenet1k_pretrain.py:B/16 \
      --workdir=gs://bucket/b16 --config.batch_size=4096

Multi-host: the same command on every host. Cloud TPU pods and SLURM are detected;
elsewhere pass --coordinator_address, --num_processes and --process_id.

SIGTERM to any process (a preemption notice): every process stops after the same step,
saves a checkpoint and exits 0; Ctrl-C does the same and exits 130, also when pressed
during compilation, an evaluation or a save (a second Ctrl-C stops at once, exit 130).
A process that dies makes the others exit non-zero
within --heartbeat_timeout_s plus a few seconds. Either way, the same command again
resumes from the last checkpoint.

The workdir is the run's identity: one live run at a time (`run.lock`), and its
`config.json` records the resolved config; a resume that changes the model, the data or
the optimiser is refused unless `--accept_changes=KEY,...` (run_record.py). A finished
run says so and prints its final metrics.

The last stdout line (process 0) is one JSON object saying what happened, also after
SIGTERM and Ctrl-C: {"status": "finished" | "preempted" | "interrupted", "step": the
step reached, "saved_step": the newest checkpoint, "eval": the newest evaluation's
metrics (absent before the first), "eval_step": its step}. Exit codes: docs/errors.md.
"""

import json
import logging as py_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from configs import common
from mixer_jax import distributed
from mixer_jax import errors
from mixer_jax import host_memory
from mixer_jax import paths
from mixer_jax import run_record

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (path[:argument]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for clusters JAX does not detect.")
flags.DEFINE_integer("num_processes", None, "Total processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout_s", 30,
                     "A process missing this long is declared dead and the others exit "
                     "(non-zero, within this many seconds plus a few).")
flags.DEFINE_integer("init_timeout_s", 120,
                     "How long to wait for all processes to join before giving up.")
flags.DEFINE_string("accept_changes", "",
                    "Resuming: config keys (comma-separated, or 'all') that may change although "
                    "they alter the run (model, data, optimiser); see run_record.py.")
flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors.")


class _QuietLibraries:
  """Drops INFO lines of orbax/tensorstore internals; their warnings still show."""
  NOISY = ("/orbax/", "/tensorstore/")

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  host_memory.keep_freed_memory()  # Before JAX starts its threads (host_memory.py).
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise errors.usage(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None or not FLAGS.workdir:
    raise errors.usage("Pass --config=CONFIG_FILE[:ARG] and --workdir=DIR.")
  errors.require_config(FLAGS.config, FLAGS["config"].config_filename)
  errors.require_known_keys(FLAGS.config, common.base_config(),
                            FLAGS["config"].config_filename)
  try:
    errors.run_guarded(lambda: _run(FLAGS.config, FLAGS.workdir), FLAGS.traceback)
  except BaseException as e:
    # Multi-process: leave at once, so no process waits on one that has stopped.
    distributed.exit_now(e)
    raise


def _run(config, workdir):
  # Every path the user gave, absolute from here on (orbax needs absolute paths).
  workdir = paths.resolve(workdir)
  logging.info("Workdir: %s", workdir)
  for key, value in paths.resolve_config(config).items():
    logging.info("config.%s: %s", key, value)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                         init_timeout_s=FLAGS.init_timeout_s)
  logging.info("Process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  # Imported once the flags have parsed: train.py loads TensorFlow (about 3 s), and a
  # mistyped flag or config file is answered before that.
  from mixer_jax import train  # pylint: disable=g-import-not-at-top
  outcome = {}
  try:
    train.train_and_evaluate(config, workdir, run_record.parse_accept(FLAGS.accept_changes),
                             outcome)
  except (errors.Interrupted, KeyboardInterrupt):
    _print_outcome(dict(outcome, status="interrupted"))
    raise
  except Exception as e:
    if jax.process_count() > 1 and distributed.is_runtime_failure(e):
      raise distributed.failure(e) from e
    raise
  _print_outcome(outcome)


def _print_outcome(outcome):
  """The last stdout line, for scripts: what happened (see the module doc)."""
  if jax.process_index() != 0 or not outcome.get("status"):
    return
  line = {k: v for k, v in outcome.items() if k != "eval" and v is not None}
  if outcome.get("eval"):
    line["eval"] = {k: round(float(v), 6) for k, v in outcome["eval"].items()}
  print(json.dumps(line), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
