"""Faster forms of the plain ops a model takes through its seams, per backend.

Each set maps a model field (`dot_general`, `conv_general_dilated`, `activation`, and
the module factories `layer_norm`, `mlp_block`) to a form equal to the plain op or
module that the model uses by default; `models.create_model` picks a set with its
`kernels` argument. A form stays here only while an A/B figure
on its target hardware says it pays (BENCHMARKS.md); tests/test_kernels.py and
tests/test_pallas.py check each against its plain twin. "pallas" awaits its figure
(issue 21: no GPU lent yet), so it is chosen only by name, never by "auto".
"""

from mixer_jax.kernels import cpu, pallas

SETS = {
    "xla": {},  # The family files' own ops.
    "cpu": cpu.OPS,
    "pallas": pallas.OPS,  # GPU kernels; the plain ops, logged once, where they cannot run.
}
