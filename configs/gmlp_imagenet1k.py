r"""gMLP from scratch on ImageNet-1k with the DeiT recipe, as gMLP was trained.

gMLP (arXiv 2105.08050, Sec. 3) trained its ImageNet models with DeiT's recipe
(configs/deit.py, every value there); only the stochastic depth is per model: the
paper's Table 1 survival probabilities gMLP-Ti 1.00, -S 0.95, -B 0.80 (read in a
third-party transcription) give drop rates 0 / 0.05 / 0.2, the last block's, linear
from 0. The values not confirmed against the gMLP paper: docs/recipes.md.
Argument: gmlp_ti16, gmlp_s16 (default) or gmlp_b16.

Expected top-1 (gMLP paper / timm): gmlp_ti16 72.3, gmlp_s16 79.6, gmlp_b16 81.6.
Hardware/time: 375,341 steps of 1024 images (300 epochs); an accelerator pod (not run
here).

  python -m mixer_jax.main --config=configs/gmlp_imagenet1k.py:gmlp_s16 \
      --workdir=/ckpt/gmlp_s16_i1k --config.data_dir=/data/tfds
"""

from configs import deit

VARIANTS = ("gmlp_ti16", "gmlp_s16", "gmlp_b16")
STOCH_DEPTH = {"gmlp_ti16": 0.0, "gmlp_s16": 0.05, "gmlp_b16": 0.2}


def get_config(arg=None):
  variant = str(arg or "gmlp_s16").strip()
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} for configs/gmlp_imagenet1k.py; use one "
                     f"of {', '.join(VARIANTS)}.")
  c = deit.get_config(variant)
  c.model.stoch_depth = STOCH_DEPTH[variant]
  return c
