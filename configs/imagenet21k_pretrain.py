r"""Mixer pre-training on ImageNet-21k: the paper's Table 4 recipe.

configs/imagenet1k_pretrain.py with MLP-Mixer (arXiv 2105.01601) Table 4's ImNet-21k
rows, where the two sizes differ in RandAugment magnitude and mixup:
  Mixer-B: RandAug. 10 | Mixup 0.2;  Mixer-L: RandAug. 20 | Mixup 0.5
(the rest as ImageNet-1k). Argument: B/16 (default), B/32, L/16 or L/32.
Data: an extracted release as --config.dataset=folder:/data/imagenet21k (no TFDS
builder is public); the first 50,000 images are held out for evaluation. Loss: sigmoid
with head bias -10 ~ log(1/21,843) (the paper does not say).

Expected (paper Table 3, after fine-tuning on ImageNet-1k at 224): Mixer-B/16 80.64%,
Mixer-L/16 82.89% top-1. Hardware/time: ~1.04M steps of 4096 images (300 epochs of
~14.2M images); a TPU v4-128 slice (not run here). More: docs/recipes.md.

  python -m mixer_jax.main --config=configs/imagenet21k_pretrain.py:B/16 \
      --workdir=/ckpt/mixer_b16_i21k --config.dataset=folder:/data/imagenet21k \
      --config.grad_accum_steps=16
"""

from configs import imagenet1k_pretrain

# Table 4, ImNet-21k rows: size -> (RandAugment magnitude, mixup alpha).
TABLE4_I21K = {"B": (10, 0.2), "L": (20, 0.5)}
HOLDOUT = 50_000


def get_config(arg=None):
  variant = imagenet1k_pretrain.parse_variant(arg, config_name="imagenet21k_pretrain")
  c = imagenet1k_pretrain.get_config(variant)
  c.dataset = "imagenet21k"     # Only a TFDS builder you registered; else folder:PATH.
  # No validation split: a held-out prefix of the (class-interleaved) train order.
  c.train_split = f"train[{HOLDOUT}:]"
  c.eval_split = f"train[:{HOLDOUT}]"
  c.randaugment_magnitude, c.mixup_alpha = TABLE4_I21K[variant.split("/")[0]]
  c.head_bias_init = -10.0
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2_000
  return c
