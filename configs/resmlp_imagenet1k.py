r"""ResMLP from scratch on ImageNet-1k (no distillation) with LAMB, as ResMLP was trained.

  python -m mixer_jax.main --config=configs/resmlp_imagenet1k.py:resmlp_12 \
      --workdir=/ckpt/resmlp_12_i1k --config.data_dir=/data/tfds

Argument: resmlp_12 (default), resmlp_24, resmlp_36 or resmlp_big_24.

Sources, per value. ResMLP (arXiv 2105.03404) trains with "a modern training strategy
using heavy data-augmentation" derived from DeiT's, with the LAMB optimiser (issue 19;
REFERENCE.md). The paper's text was not at hand when this file was written, so its
section numbers are not cited and the values marked (*) are recalled, not re-read:
check them against the paper's training-setup section before a long run.

  LAMB (optax.lamb, optim.py)        issue 19 / the paper: "ResMLP used LAMB"
  lr 5e-3, cosine decay (*)          min lr 1e-5 as DeiT's code (`deit` main.py --min-lr)
  weight decay 0.2 (*)               LAMB's decoupled decay, kernels only (optim.py)
  batch 1024, 400 epochs (*)
  5 warmup epochs                    DeiT's code default (--warmup-epochs 5)
  label smoothing 0.1                DeiT's code default (--smoothing 0.1)
  RandAugment 2 ops, magnitude 27    DeiT's rand-m9 (9 of timm's 10 = 27 of our 30)
  mixup 0.8, CutMix 1.0              DeiT's code defaults, one of the two per batch
  stochastic depth 0.0 (resmlp_12)   the official code's default drop_path_rate
                                     (facebookresearch/deit resmlp_models.py); deeper
                                     models were regularised more (*): e.g. 0.1
  eps 1e-6                           timm's and optax's LAMB default
  evaluation: resize then central    README_resmlp.md of facebookresearch/deit: "a
  crop at 0.9 of the side            crop-ratio of 0.9 at test time"
  LayerScale init                    the official code's resmlp_12 starts at 0.1, 24 at
                                     1e-5, 36 and big_24 at 1e-6; this codebase takes
                                     timm's (1e-4 for resmlp_12, the others the same):
                                     `models.create_model(..., layerscale_init=0.1)`
                                     has no config key yet.

Not available here, so left out: random erasing, repeated augmentation, and the
distillation of the paper's distilled models (DeiT-style teacher).

Expected top-1 without distillation (timm's results for the released weights):
resmlp_12 76.66, resmlp_24 79.38, resmlp_36 79.77.
"""

from configs import common

VARIANTS = ("resmlp_12", "resmlp_24", "resmlp_36", "resmlp_big_24")


def get_config(arg=None):
  variant = str(arg or "resmlp_12").strip()
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} for configs/resmlp_imagenet1k.py; use "
                     f"one of {', '.join(VARIANTS)}.")
  c = common.base_config()
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.train_crop = "inception"
  c.train_flip = True
  c.randaugment_layers = 2
  c.randaugment_magnitude = 27
  c.eval_preprocess = "resize_crop"
  c.eval_crop_fraction = 0.9

  c.model.variant = variant
  c.model.tokens_mlp_dim = 0  # ResMLP has none.
  c.model.stoch_depth = 0.0 if variant == "resmlp_12" else 0.1
  c.model.dropout = 0.0
  c.dtype = "bfloat16"

  c.loss = "softmax"
  c.label_smoothing = 0.1
  c.mixup_alpha = 0.8
  c.cutmix_alpha = 1.0

  c.optimizer = "lamb"
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-6
  c.weight_decay = 0.2
  c.grad_clip_norm = 0.0
  c.batch_size = 1024
  c.learning_rate = 5e-3
  c.lr_decay = "cosine"
  c.end_learning_rate = 1e-5
  c.num_epochs = 400.0
  c.num_train_steps = 0
  c.warmup_steps = 5 * 1_281_167 // c.batch_size  # 5 epochs of ImageNet-1k train.
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 1_000
  return c
