"""User errors at the entry points: one sentence on stderr and a non-zero exit.

The loop and services raise these (or ValueError / FileNotFoundError); only entry
points turn them into an exit code, so nothing in the library calls sys.exit.
`--traceback` shows the full trace instead. Six kinds, each with its exit code:

  class             what the user fixes                                  exit code
  ConfigError       a config value, flag or command-line usage           2 USER_ERROR
  DataError         a dataset or image that cannot be read or does not   2 USER_ERROR
                    fit the config
  WorkdirError      a workdir that cannot be used (lock, record, resume) 2 USER_ERROR
  CheckpointError   a weight file or checkpoint that does not fit the    2 USER_ERROR
                    requested model, size, classes or dataset
  NonFiniteError    nothing: the run stopped itself (NaN/inf loss)       3 STOPPED
  Interrupted       nothing: Ctrl-C (a checkpoint was saved, or on a     130 INTERRUPTED
                    second Ctrl-C the run stopped at once)               (128 + SIGINT)
"""

import difflib
import os
import re
import signal
import sys

from absl import app
from absl import flags


def short(error: BaseException) -> str:
  """An exception as a clause for a sentence: its type and the first line of its text."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class ConfigError(ValueError):
  """A config value, flag or command-line usage that cannot work."""


class DataError(ValueError):
  """A dataset or image that cannot be read or does not fit the config."""


class WorkdirError(ValueError):
  """A workdir that cannot be used."""


class CheckpointError(ValueError):
  """A weight file or checkpoint that cannot be used with the requested model, image
  size, classes or dataset."""


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/inf."""


class Interrupted(RuntimeError):
  """Ctrl-C: the run saved a checkpoint (or, on a second Ctrl-C, stopped at once)."""


USER_ERROR = 2
STOPPED = 3
INTERRUPTED = 130


def exit_on_ctrl_c(message: str, cleanup=None):
  """Ctrl-C in a tool that writes nothing until its end (evaluate, export): one line
  `Interrupted: <message>`, exit 130 at once. A handler, not KeyboardInterrupt: raised
  inside XLA's compilation or a C++ callback, that is a traceback or a crash."""
  def handler(signum, frame):
    del signum, frame
    if cleanup is not None:
      try:
        cleanup()
      except OSError:
        pass
    sys.stdout.flush()
    print(f"Interrupted: {message}", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)  # pylint: disable=protected-access

  signal.signal(signal.SIGINT, handler)


def usage(message: str) -> app.UsageError:
  """A command-line usage error: absl prints `message` with the flags' help and exits 2
  (absl's own default is 1)."""
  return app.UsageError(message, exitcode=USER_ERROR)


def run_guarded(fn, show_traceback: bool = False):
  try:
    return fn()
  except Interrupted as e:
    print(f"Interrupted: {e}", file=sys.stderr)
    sys.exit(INTERRUPTED)
  except KeyboardInterrupt:
    if show_traceback:
      raise
    print("Interrupted: stopped at once, nothing saved since the last checkpoint.",
          file=sys.stderr)
    sys.exit(INTERRUPTED)
  except NonFiniteError as e:
    if show_traceback:
      raise
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(STOPPED)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    if show_traceback:
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"Error: {message} (run with --traceback for details)", file=sys.stderr)
    sys.exit(USER_ERROR)



def parse_flags(argv):
  """absl flag parsing with one sentence and exit 2 for every bad flag: unknown config
  keys, values of the wrong type, a config file's own ValueError (e.g. an unknown
  variant in `--config=configs/x.py:Q/3`). `--traceback` shows the full trace."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # ml_collections raises KeyError/AttributeError/ValueError here.
    if "--traceback" in argv:
      raise
    print(f"Error: {_flag_error_sentence(e, argv)}", file=sys.stderr)
    sys.exit(USER_ERROR)


def _config_path(argv) -> str:
  """The file of `--config=PATH[:ARG]` (or `--config PATH`) in argv; "" if none."""
  for i, arg in enumerate(argv):
    value = (arg.split("=", 1)[1] if arg.startswith("--config=") else
             argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None:
      return value.split(":", 1)[0]
  return ""


def _config_file_sentence(chain, path: str):
  """A config file that is missing, does not parse or raises while it runs: one
  sentence naming the file (and line). None if the error is not the file's."""
  if not path:
    return None
  real = os.path.realpath(path)
  for e in chain:
    if isinstance(e, SyntaxError) and e.lineno:
      return (f"Config file {path} has a syntax error at line {e.lineno} ({e.msg}); fix "
              "it and run again.")
  for e in chain:
    if isinstance(e, ValueError):
      continue  # A config file's own sentence (e.g. an unknown variant) is kept as is.
    tb, line = e.__traceback__, None
    while tb is not None:
      if os.path.realpath(tb.tb_frame.f_code.co_filename) == real:
        line = tb.tb_lineno
      tb = tb.tb_next
    if line is not None:
      return (f"Config file {path} raises {type(e).__name__} at line {line} ({e}); fix "
              "it and run again.")
  if not os.path.isfile(path) and any(isinstance(e, OSError) for e in chain):
    reason = "it is a directory" if os.path.isdir(path) else "no such file"
    return (f"Config file {path} cannot be loaded ({reason}); pass --config=PATH[:ARG] "
            "with an existing file such as configs/default.py.")
  return None


def _flag_error_sentence(error: BaseException, argv) -> str:
  chain, e = [], error
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  sentence = _config_file_sentence(chain, _config_path(argv))
  if sentence:
    return sentence
  text = " ".join(str(e) for e in chain)
  for e in chain:
    if isinstance(e, (KeyError, AttributeError)):
      keys = re.findall(r"'([A-Za-z_][A-Za-z0-9_.]*)'", str(e))
      hint = re.search(r'Did you mean "([^"]+)"', text)
      if keys:
        return (f"Unknown config key {keys[0]!r}" +
                (f" (did you mean {hint.group(1)!r}?)" if hint else "") +
                "; every key is listed in configs/common.py.")
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      name, value = arg[len("--"):].split("=", 1)
      if value and repr(value) in text or f"'{value}'" in text:
        return (f"--{name}={value} has the wrong type ({str(chain[-1]).splitlines()[0]}); "
                "use a value of that key's type (see configs/common.py).")
  deepest = [e for e in chain if isinstance(e, ValueError)] or chain
  return (str(deepest[-1]).strip().splitlines() or [type(deepest[-1]).__name__])[0]


def require_config(config, flag_value: str = ""):
  """ml_collections loads a config file lazily; a missing or broken file is one sentence."""
  try:
    config.keys()
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f"Error: Config file {flag_value or ''} cannot be loaded ({lines[-1] if lines else e}); "
          "pass --config=PATH[:ARG] with an existing file such as configs/default.py.",
          file=sys.stderr)
    sys.exit(USER_ERROR)


def _leaf_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    keys |= (_leaf_keys(value, f"{prefix}{key}.") if hasattr(value, "items")
             else {prefix + key})
  return keys


def require_known_keys(config, reference, flag_value: str = ""):
  """A key that a config FILE sets but the trainer does not read (`c.batchsize = 8`) is
  refused like a command-line typo: one sentence with a did-you-mean, exit 2."""
  known = _leaf_keys(reference)
  unknown = sorted(_leaf_keys(config) - known)
  if unknown:
    hint = difflib.get_close_matches(unknown[0], sorted(known), n=1)
    print(f"Error: Config file {flag_value} sets unknown key {unknown[0]!r}" +
          (f" (did you mean {hint[0]!r}?)" if hint else "") +
          "; every key is listed in configs/common.py.", file=sys.stderr)
    sys.exit(USER_ERROR)

