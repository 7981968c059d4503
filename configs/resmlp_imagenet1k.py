r"""ResMLP from scratch on ImageNet-1k (no distillation) with LAMB, as ResMLP was trained.

ResMLP (arXiv 2105.03404) Sec. 3.1: LAMB, learning rate 5e-3, weight decay 0.2, "the
rest of the hyper-parameters follow the default setting used in DeiT" (configs/deit.py);
400 epochs (Table 3 caption). From the first author's run list (deit issue 106):
stochastic depth 0.05 for resmlp_12 (0.1, DeiT's, for the deeper ones), LAMB eps 1e-6,
and evaluation at a crop ratio of 0.9. The source of each value: docs/recipes.md.
Argument: resmlp_12 (default), resmlp_24, resmlp_36 or resmlp_big_24.

Expected top-1 without distillation (timm's results for the released weights):
resmlp_12 76.66, resmlp_24 79.38, resmlp_36 79.77. Hardware/time: 500,455 steps of
1024 images (400 epochs); an accelerator pod (not run here).

  python -m mixer_jax.main --config=configs/resmlp_imagenet1k.py:resmlp_12 \
      --workdir=/ckpt/resmlp_12_i1k --config.data_dir=/data/tfds
"""

from configs import deit

VARIANTS = ("resmlp_12", "resmlp_24", "resmlp_36", "resmlp_big_24")


def get_config(arg=None):
  variant = str(arg or "resmlp_12").strip()
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} for configs/resmlp_imagenet1k.py; use "
                     f"one of {', '.join(VARIANTS)}.")
  c = deit.get_config(variant)
  c.eval_crop_fraction = 0.9
  c.model.stoch_depth = 0.05 if variant == "resmlp_12" else 0.1
  c.optimizer = "lamb"
  c.eps = 1e-6
  c.weight_decay = 0.2
  c.learning_rate = 5e-3        # The peak lr; the paper gives no batch rule.
  c.num_epochs = 400.0
  return c
