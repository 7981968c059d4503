r"""Mixer pre-training from scratch on ImageNet-1k: the paper's Table 4 recipe.

MLP-Mixer (arXiv 2105.01601) Table 4, rows Mixer-B / Mixer-L on ImNet (identical):
epochs 300 | lr 0.001 | wd 0.1 | RandAug. 15 | Mixup 0.5 | Dropout 0.0 | Stoch. depth 0.1;
Section 3 / Appendix B: Adam (0.9, 0.999), batch 4096, clipping at norm 1, 10k warmup
steps then linear decay, 224 px, Inception crop + flip, RandAugment 2 layers.
Argument: the variant, B/16 (default), B/32, L/16 or L/32 (the sizes Table 4 has).

Expected (paper Table 3, after fine-tuning at 224): Mixer-B/16 76.44% top-1 (ReaL
82.36), Mixer-L/16 71.76%; big_vision's public JAX run: B/16 76.3% after pre-training.
Hardware/time: 93,835 steps of 4096 images; a TPU v4-32 slice or 8 GPUs with
gradient accumulation (not run here). Conventions where the paper is silent (loss,
weight-decay scaling, evaluation crop) and the GPU/TPU commands: docs/recipes.md.

  python -m mixer_jax.main --config=configs/imagenet1k_pretrain.py:B/16 \
      --workdir=/ckpt/mixer_b16_i1k --config.data_dir=/data/tfds --config.grad_accum_steps=16
"""

from configs import common

# Table 4 has ImageNet-1k rows for Mixer-B and Mixer-L (the same values for both).
VARIANTS = ("B/16", "B/32", "L/16", "L/32")
DEFAULT_VARIANT = "B/16"


def parse_variant(arg, variants=VARIANTS, config_name="imagenet1k_pretrain"):
  """The config-file argument (`path.py:B/16`) -> a variant of `variants`."""
  variant = DEFAULT_VARIANT if arg is None or not str(arg).strip() else str(arg).strip()
  if variant not in variants:
    raise ValueError(
        f"Unknown variant {variant!r} for configs/{config_name}.py; use one of "
        f"{', '.join(variants)} (the sizes with a row in the paper's Table 4), e.g. "
        f"--config=configs/{config_name}.py:B/16.")
  return variant


def get_config(arg=None):
  variant = parse_variant(arg)
  c = common.base_config()
  c.dataset = "imagenet2012"
  c.eval_split = "validation"  # All 50,000 images, each counted once.
  c.randaugment_layers = 2
  c.randaugment_magnitude = 15

  c.model.variant = variant
  c.model.stoch_depth = 0.1
  # L (and H): blocks under nn.scan, each recomputed in the backward pass (BENCHMARKS.md,
  # "Scan and remat"); B stays unrolled, where scan gains little.
  large = variant.split("/")[0] in ("L", "H")
  c.model.scan = large
  c.model.remat_policy = "full" if large else "none"
  c.dtype = "bfloat16"

  c.loss = "sigmoid"            # The paper does not say; big_vision's run uses this.
  c.head_bias_init = -6.9       # log(1/1000), each class's prior.
  c.mixup_alpha = 0.5
  c.weight_decay = 0.1          # Decoupled: times the lr (1e-4 at the peak).
  c.warmup_steps = 10_000
  return c
