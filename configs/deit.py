r"""DeiT's ImageNet-1k training recipe, which ResMLP and gMLP were trained with.

Touvron et al. 2021 (arXiv 2012.12877) Table 9, as the defaults of
`facebookresearch/deit` main.py: AdamW lr 5e-4 x batch / 512 at batch 1024, weight
decay 0.05, 300 epochs, cosine decay to 1e-5 after 5 warmup epochs, no clipping, label
smoothing 0.1, RandAugment rand-m9-mstd0.5 (2 ops, 27 on our 0-30 scale), mixup 0.8 /
CutMix 1.0, stochastic depth 0.1. Left out (not available here): random erasing,
repeated augmentation, model EMA. Sources per value: docs/recipes.md.
configs/resmlp_imagenet1k.py and configs/gmlp_imagenet1k.py start from this.

Argument: any variant (required). Expected result and time: those of the recipe that
starts from it; this file alone reproduces no published number.

  python -m mixer_jax.main --config=configs/deit.py:gmlp_s16 --workdir=/ckpt/deit_gmlp_s16
"""

from configs import common

IMAGENET1K_TRAIN = 1_281_167  # Images in ImageNet-1k's train split.


def get_config(variant: str = ""):
  variant = str(variant or "").strip()
  if not variant:
    raise ValueError("configs/deit.py needs a variant: --config=configs/deit.py:gmlp_s16.")
  c = common.base_config()
  c.dataset = "imagenet2012"
  c.eval_split = "validation"
  c.randaugment_layers = 2
  c.randaugment_magnitude = 27  # timm's magnitude 9 of 10.

  c.model.variant = variant
  c.model.stoch_depth = 0.1
  c.dtype = "bfloat16"

  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0

  c.optimizer = "adam"          # Decoupled weight decay on kernels: AdamW.
  c.weight_decay = 0.05
  c.grad_clip_norm = 0.0
  c.batch_size = 1024
  c.learning_rate = 5e-4 * c.batch_size / 512
  c.lr_decay = "cosine"
  c.end_learning_rate = 1e-5
  c.warmup_steps = 5 * IMAGENET1K_TRAIN // c.batch_size  # 5 epochs.
  return c
