"""The package's floors (shared/DESIGN.md): a module imports only from floors below it.

Reads every module's imports, function-local ones included, so an upward import or a
circle fails here instead of surfacing as an import-order bug.
"""

import ast
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mixer_jax")

# Top-level modules and subpackages of mixer_jax, by floor.
FLOORS = {
    0: ("errors", "host_memory", "paths", "hub"),
    1: ("models", "optim", "sharding", "metrics", "distributed", "fewshot", "augment",
        "resolution", "datasets", "timm_layout", "run_record", "workdir_lock", "randaugment",
        "device_memory"),
    2: ("steps", "checkpoint", "input_pipeline", "kernels"),
    3: ("state", "weights", "workdir"),
    4: ("evaluator",),
    5: ("train",),
    6: ("main", "evaluate", "predict", "export", "tools"),
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}
ENTRY_POINTS = FLOORS[max(FLOORS)]


def _unit(relative_path: str) -> str:
  """mixer_jax/models/mixer.py -> models; mixer_jax/train.py -> train."""
  parts = relative_path[:-len(".py")].split(os.sep)
  return parts[0]


def _imported_units(path: str):
  """Top-level mixer_jax units that the file at `path` imports, anywhere in it."""
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      if parts[0] == "mixer_jax" and len(parts) > 1:
        found.add(parts[1])
  return found


def _edges():
  """Every unit's imports, read in a fresh interpreter: CPython 3.11's ast.parse can fail
  with "AST constructor recursion depth mismatch" in a process whose earlier tests left
  its recursion bookkeeping off (seen once in the full suite)."""
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_imports; "
          "print(json.dumps({k: sorted(v) for k, v in test_imports.edges_here().items()}))")
  out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)],
                       capture_output=True, text=True, check=True).stdout
  return {k: set(v) for k, v in json.loads(out).items()}


def edges_here():
  edges = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        relative = os.path.relpath(path, PACKAGE)
        if relative == "__init__.py":
          continue
        unit = _unit(relative)
        edges.setdefault(unit, set()).update(_imported_units(path) - {unit})
  return edges


def test_every_module_has_a_floor():
  missing = sorted(set(_edges()) - set(FLOOR))
  assert not missing, f"Give these modules a floor in FLOORS (and DESIGN.md): {missing}"


def test_imports_only_go_downward():
  upward = [f"{a} (floor {FLOOR[a]}) imports {b} (floor {FLOOR.get(b)})"
            for a, targets in sorted(_edges().items()) for b in sorted(targets)
            if b not in FLOOR or FLOOR[b] >= FLOOR[a]]
  assert not upward, "\n".join(upward)


def test_no_import_circle():
  # Implied by strictly downward floors; checked directly so the failure names the circle.
  edges = _edges()
  visiting, done = [], set()

  def visit(node):
    if node in visiting:
      raise AssertionError("import circle: " + " -> ".join(visiting[visiting.index(node):]
                                                           + [node]))
    if node in done:
      return
    visiting.append(node)
    for target in sorted(edges.get(node, ())):
      visit(target)
    visiting.pop()
    done.add(node)

  for node in sorted(edges):
    visit(node)


def test_the_checker_sees_function_local_imports(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from mixer_jax import train\n  import mixer_jax.models.mixer\n")
  assert _imported_units(str(path)) == {"train", "models"}


def test_importing_the_package_has_no_side_effects():
  # No sys.path edit, no malloc setting, no JAX or TensorFlow start at import.
  code = ("import sys; before = list(sys.path); import mixer_jax; "
          "print(sys.path == before, 'jax' in sys.modules, 'tensorflow' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["True", "False", "False"]


def test_setup_path_imports_no_tensorflow():
  # state.py (and everything under it) and the weight files (export, the released and
  # timm layouts, hf-hub:) run on GPU images without TensorFlow.
  code = ("import sys; import mixer_jax.state, mixer_jax.tools.benchmark, "
          "mixer_jax.weights, mixer_jax.export, mixer_jax.randaugment; "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', "
          "'clu') if m in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["[]"]
