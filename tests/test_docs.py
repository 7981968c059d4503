"""The documents against the code: the error catalogue (docs/errors.md) names sentences
the code still says and every exception class with its exit code; every command line in
the README and docs/ names a module, script and config that exist, with config keys the
config has; every local link resolves; README and BENCHMARKS.md stay short."""

import ast
import functools
import importlib
import pathlib
import re

import pytest

from mixer_jax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "launch" / "README.md"]
              + list((ROOT / "docs").glob("*.md")))
GAP = "…"  # in a catalogue fragment: the pieces occur in this order in one string


def _rel(path):
  return str(path.relative_to(ROOT))


@functools.lru_cache(maxsize=None)
def _source():
  """Every string literal under mixer_jax/ and configs/ (an f-string's replacement
  fields as NUL, implicit concatenation joined as Python joins it), and the raw text."""
  literals, raw = [], []
  for folder in ("mixer_jax", "configs"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      text = path.read_text()
      raw.append(text)
      for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.JoinedStr):
          literals.append("".join(v.value if isinstance(v, ast.Constant) else "\0"
                                  for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
          literals.append(node.value)
  return literals, " ".join(" ".join(raw).split())


def _in_code(fragment):
  pieces = [p.strip() for p in fragment.split(GAP) if p.strip()]
  literals, raw = _source()
  for text in literals:
    at = 0
    for piece in pieces:
      at = text.find(piece, at)
      if at < 0:
        break
      at += len(piece)
    else:
      return True
  # Not a message but code (e.g. how an image is decoded): the source text itself.
  return len(pieces) == 1 and " ".join(pieces[0].split()) in raw


def _table(text, header_start):
  """Rows (lists of cells) of the markdown table whose header starts with header_start."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
  return rows


def _errors_md():
  return (ROOT / "docs" / "errors.md").read_text()


def test_every_catalogue_row_names_a_sentence_the_code_still_says():
  rows = _table(_errors_md(), "| # | input")
  assert len(rows) > 40, "the catalogue table in docs/errors.md was not found whole"
  stale = []
  for cells in rows:
    fragment = re.fullmatch(r"`([^`]+)`", cells[-1])
    if not fragment:
      stale.append(f"row {cells[0]}: no `fragment` in the last column")
    elif not _in_code(fragment.group(1)):
      stale.append(f"row {cells[0]} ({cells[1][:50]}): {fragment.group(1)!r}")
  assert not stale, ("docs/errors.md rows whose fragment occurs nowhere under mixer_jax/ "
                     "or configs/ (update the row to the code's present sentence):\n  "
                     + "\n  ".join(stale))


def _exit_code(cls):
  def fail():
    raise cls("a test message.")
  try:
    errors.run_guarded(fail)
  except SystemExit as e:
    return e.code
  return getattr(cls, "exit_code", None)


def test_every_exception_class_is_catalogued_with_its_exit_code(capsys):
  documented = {}
  for cells in _table(_errors_md(), "| class"):
    name = re.fullmatch(r"`(\w+)`", cells[0])
    assert name, f"docs/errors.md exit-code row without a `ClassName`: {cells}"
    documented[name.group(1)] = int(cells[-1])
  classes = {name: obj for name, obj in vars(errors).items()
             if isinstance(obj, type) and issubclass(obj, BaseException)
             and obj.__module__ == errors.__name__}
  assert classes, "no exception class found in mixer_jax/errors.py"
  problems = []
  for name, cls in sorted(classes.items()):
    code = _exit_code(cls)
    if name not in documented:
      problems.append(f"{name} (exit {code}) is not in the table")
    elif documented[name] != code:
      problems.append(f"{name}: the table says exit {documented[name]}, the code gives {code}")
  problems += [f"{name} is in the table but not in mixer_jax/errors.py"
               for name in sorted(set(documented) - set(classes))]
  capsys.readouterr()
  assert not problems, "docs/errors.md exit-code table is stale:\n  " + "\n  ".join(problems)


def _commands(text):
  """Command lines of a markdown text: code-block lines (backslash continuations
  joined) and inline code spans."""
  commands, prose = [], []
  fenced = False
  lines = iter(text.splitlines())
  for line in lines:
    if line.lstrip().startswith("```"):
      fenced = not fenced
      continue
    if fenced or line.startswith("    "):
      while line.rstrip().endswith("\\"):
        line = line.rstrip()[:-1] + " " + next(lines, "").strip()
      commands.append(line.strip())
    else:
      prose.append(line)
  commands += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", "\n".join(prose))]
  return [c for c in commands if re.search(r"python|--config|\.sh\b", c)]


def _placeholder(value):
  return bool(re.fullmatch(r"[A-Z_]+|.*(\.\.\.|<|\$).*", value))


@functools.lru_cache(maxsize=None)
def _config(path, arg):
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  return module.get_config(arg) if arg is not None else module.get_config()


def _has_key(config, dotted):
  for key in dotted.split("."):
    try:
      config = config[key]
    except (KeyError, TypeError, AttributeError):
      return False
  return True


def _command_problems(command):
  problems = []
  for module in re.findall(r"python3?\s+-m\s+(mixer_jax(?:\.\w+)*)", command):
    path = ROOT.joinpath(*module.split("."))
    if not (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()):
      problems.append(f"module {module} does not exist")
  for script in re.findall(r"(?:^|\s)((?:benchmarks|launch|tests)/[\w/]+\.(?:py|sh))", command):
    if not (ROOT / script).is_file():
      problems.append(f"script {script} does not exist")
  configs = re.findall(r"--config=(configs/[\w/]+\.py)(?::([^\s\]`]+))?", command)
  for path, arg in configs:
    if not (ROOT / path).is_file():
      problems.append(f"config {path} does not exist")
      continue
    if arg and _placeholder(arg):
      continue
    try:
      config = _config(path, arg or None)
    except Exception as e:  # the config's own refusal of its argument
      problems.append(f"{path}:{arg} is refused ({type(e).__name__}: {e})")
      continue
    for key in re.findall(r"--config\.([A-Za-z_][\w.]*)=", command):
      if not _placeholder(key) and not _has_key(config, key):
        problems.append(f"{path}:{arg} has no key config.{key}")
  return problems


def test_every_command_line_names_existing_modules_configs_and_keys():
  problems = []
  for doc in DOCS:
    for command in _commands(doc.read_text()):
      problems += [f"{_rel(doc)}: {p}: {command[:100]}" for p in _command_problems(command)]
  assert not problems, "stale command lines:\n  " + "\n  ".join(sorted(set(problems)))


def test_the_setup_line_makes_later_bare_python_commands_work():
  # The README's setup activates the venv, so its later `python -m ...` lines run as typed.
  text = (ROOT / "README.md").read_text()
  setup = next(c for c in _commands(text) if "pip install" in c)
  assert "source .venv/bin/activate" in setup, setup
  assert ".venv/bin/python" not in text.split(setup, 1)[1], (
      "after the setup line the README should spell python one way: bare `python`")


def test_every_local_link_resolves():
  missing = []
  for doc in DOCS:
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      if not (doc.parent / target.split("#")[0]).exists():
        missing.append(f"{_rel(doc)} -> {target}")
  assert not missing, "links to files that do not exist:\n  " + "\n  ".join(missing)


@pytest.mark.parametrize("name, limit", [("README.md", 300), ("BENCHMARKS.md", 300)])
def test_front_documents_stay_short(name, limit):
  lines = len((ROOT / name).read_text().splitlines())
  assert lines <= limit, f"{name} has {lines} lines; move detail to docs/ (limit {limit})"
