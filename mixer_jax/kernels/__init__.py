"""Faster forms of the plain ops a model takes through its seams, per backend.

Each set maps a model field (`dot_general`, `conv_general_dilated`, `activation`) to
a form equal to the plain op that the model uses by default; `models.create_model`
picks a set with its `kernels` argument. A form stays here only while an A/B figure
on its target hardware says it pays (BENCHMARKS.md); tests/test_kernels.py
checks each against its plain twin.
"""

from mixer_jax.kernels import cpu

SETS = {
    "xla": {},  # The family files' own ops.
    "cpu": cpu.OPS,
}
