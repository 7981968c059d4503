"""Faster forms of the models' layers, per backend, entered through flax's method
interceptors (`nn.intercept_methods`) around `apply`: the model files stay the plain
papers, and no module has a field per op.

`interceptors(kernels)` gives what a `kernels` name stands for: "xla" none (flax's own
layers), "cpu" kernels/cpu.py, "pallas" kernels/pallas.py (EXPERIMENTAL: chosen only by
name), "auto" "cpu" on the CPU backend and "xla" elsewhere. A form stays here only while
an A/B figure on its target hardware says it pays (BENCHMARKS.md);
tests/test_kernels.py and tests/test_pallas.py check each against its plain twin. The
"cpu" matmul and the "pallas" kernels have custom VJPs, so forward-mode autodiff
(jax.jvp, jax.jacfwd) needs kernels="xla".
"""

import contextlib

import flax.linen as nn
import jax

from mixer_jax.kernels import cpu, pallas

KERNELS = ("auto", "xla", "cpu", "pallas")


def interceptors(kernels: str = "auto") -> tuple:
  """The flax method interceptors that `kernels` stands for (() = the plain layers)."""
  if kernels == "auto":
    kernels = "cpu" if jax.default_backend() == "cpu" else "xla"
  return {"xla": (), "cpu": (cpu.intercept,), "pallas": (pallas.interceptor(),)}[kernels]


class Intercepted:
  """`model` with flax method `interceptors` installed around its `init` and `apply`
  (the first outermost); every other attribute is the model's. `clone` keeps them."""

  def __init__(self, model, interceptors=()):
    self.model, self.interceptors = model, tuple(interceptors)

  def _run(self, fn, *args, **kwargs):
    with contextlib.ExitStack() as stack:
      for intercept in self.interceptors:
        stack.enter_context(nn.intercept_methods(intercept))
      return fn(*args, **kwargs)

  def init(self, *args, **kwargs):
    return self._run(self.model.init, *args, **kwargs)

  def apply(self, *args, **kwargs):
    return self._run(self.model.apply, *args, **kwargs)

  def clone(self, **fields):
    return Intercepted(self.model.clone(**fields), self.interceptors)

  def __getattr__(self, name):
    if name == "model":  # Not yet set (e.g. while unpickling): no recursion.
      raise AttributeError(name)
    return getattr(self.model, name)
