r"""Mixer pre-training from scratch on ImageNet-1k: the paper's Table 4 recipe.

Source: MLP-Mixer (arXiv 2105.01601), Appendix B, Table 4 ("Hyperparameter
settings used for pre-training Mixer models"), rows Mixer-B / Mixer-L on ImNet
(the two rows are identical):

  epochs 300 | lr 0.001 | wd 0.1 | RandAug. 15 | Mixup 0.5 | Dropout 0.0 | Stoch. depth 0.1

and Section 3 / Appendix B for the rest: Adam (0.9, 0.999), batch 4096, gradient
clipping at global norm 1, linear warmup of 10k steps then linear decay,
resolution 224, Inception crop + horizontal flip, RandAugment with 2 layers.

Argument: the variant, `B/16` (default), `B/32`, `L/16` or `L/32` (Table 4 has
ImageNet rows only for Mixer-B and Mixer-L; for another size start from one of
them and set --config.model.variant, knowing the paper gives no recipe for it).

Expected result (paper Table 3, "Pre-trained on ImageNet (with extra
regularization)", measured after fine-tuning on ImageNet at 224):
  Mixer-B/16: 76.44% top-1, ReaL 82.36.   Mixer-L/16: 71.76% top-1, ReaL 77.08.
A public JAX reproduction of this recipe (big_vision's mlp_mixer_i1k config) reports
76.3% for B/16 straight after pre-training (300 epochs) and 70.5% after 60 epochs.

Length: ImageNet-1k train has 1,281,167 images; 300 epochs at batch 4096 is
int(300 * 1,281,167 / 4096) = 93,835 steps (the trainer computes this from the data,
num_train_steps=0). The warmup takes the first 10,000 of them (~32 epochs).

Conventions this config fixes where the paper is silent or ambiguous:
- Weight decay 0.1 is decoupled (AdamW style) and multiplied by the learning rate:
  each step shrinks kernels by lr * 0.1 (1e-4 at the peak lr); biases and LayerNorm
  are not decayed. Codebases that decay without the lr factor write this as 1e-4.
- Mixup 0.5 is the Beta(0.5, 0.5) mixing weight alpha, one weight per batch.
- Loss: per-class sigmoid cross-entropy with the head bias initialised to -6.9
  (log 1/1000, the prior of each class), as in the public reproduction above; the
  paper does not say. --config.loss=softmax --config.head_bias_init=0 is the
  alternative.
- Stochastic depth 0.1 is the rate of the last block, 0 for the first, linear in
  between (paper Appendix B); kept branches are rescaled by 1/(1 - rate).
- Evaluation (eval_preprocess="resize_crop"): shorter side to 256, central 224 crop,
  the paper's "resmall-crop" that Appendix C says was used for the ImageNet numbers of
  Table 3 (and the one the public reproduction uses). eval_preprocess="resize"
  (straight to 224x224) is the released fine-tuning code's convention instead.
- dtype bfloat16: matmuls in bf16 on accelerators; parameters, optimiser state,
  loss and metrics stay float32 (--config.dtype=float32 to compute in fp32).

Data: TFDS imagenet2012 (put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
the TFDS manual dir, config.manual_dir), or any class-per-folder copy with
--config.dataset=folder:/data/imagenet (needs train/ and validation/ (or val/)
subfolders). Evaluation: the 50,000 validation images, each counted once.

Commands:

Cloud TPU pod slice, e.g. v4-32 (4 hosts, 16 chips, 256 images per chip), the same
command started on every host:

  launch/tpu_pod.sh all --name mixer-b16 --zone us-central2-b \
      --accelerator-type v4-32 --spot --workdir gs://BUCKET/mixer_b16_i1k \
      --env TFDS_DATA_DIR=gs://BUCKET/tfds \
      -- --config=configs/imagenet1k_pretrain.py:B/16

One GPU host with 8 GPUs (one process sees all of them): keep the global batch at
4096 with gradient accumulation, 4096 = 8 GPUs x 32 images per micro-batch x 16:

  python -m mixer_jax.main --config=configs/imagenet1k_pretrain.py:B/16 \
      --workdir=/ckpt/mixer_b16_i1k --config.data_dir=/data/tfds \
      --config.grad_accum_steps=16

k accumulated micro-batches give the update of one batch k times larger, so raise the
per-GPU micro-batch (grad_accum_steps 8, 4, ...) as far as GPU memory allows: fewer,
larger micro-batches are faster. On one GPU: --config.grad_accum_steps=128 (32 per
micro-batch). Several GPU hosts: launch/slurm.sh --nodes N -- --config=... (same flags).
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

  # Data: ImageNet-1k, train on the full train split, evaluate on all 50k val images.
  c.dataset = "imagenet2012"
  c.train_split = "train"
  c.eval_split = "validation"
  c.num_classes = 0  # From the dataset: 1000.
  c.image_size = 224
  c.train_crop = "inception"
  c.train_flip = True
  c.randaugment_layers = 2
  c.randaugment_magnitude = 15
  c.eval_preprocess = "resize_crop"
  c.eval_crop_fraction = 224 / 256
  c.log_image_grid = True

  # Model.
  c.model.variant = variant
  c.model.stoch_depth = 0.1
  c.model.dropout = 0.0
  # L (and H): blocks under nn.scan, each recomputed in the backward pass. H/14's train
  # step then compiles 4.4x faster and peaks at 8.5 instead of 25 GiB per device
  # (BENCHMARKS.md, "Scan and remat"); B stays unrolled, where scan gains little.
  large = variant.split("/")[0] in ("L", "H")
  c.model.scan = large
  c.model.remat_policy = "full" if large else "none"
  c.dtype = "bfloat16"

  # Loss and regularisation.
  c.loss = "sigmoid"
  c.head_bias_init = -6.9
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.5

  # Optimiser: clip 1 -> Adam(0.9, 0.999) -> decoupled wd 0.1 -> 10k warmup + linear decay.
  c.optimizer = "adam"
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.learning_rate = 1e-3
  c.warmup_steps = 10_000
  c.lr_decay = "linear"
  c.end_learning_rate = 0.0

  # Steps: 300 epochs of 4096 images; the trainer derives the step count.
  c.batch_size = 4096
  c.grad_accum_steps = 1
  c.num_train_steps = 0
  c.num_epochs = 300.0
  c.log_every_steps = 100
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 1_000
  return c
