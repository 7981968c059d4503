r"""Mixer pre-training on ImageNet-21k: the paper's Table 4 recipe.

Source: MLP-Mixer (arXiv 2105.01601), Appendix B, Table 4 ("Hyperparameter
settings used for pre-training Mixer models"), rows ImNet-21k. Unlike ImageNet-1k,
the two sizes differ in RandAugment magnitude and mixup:

  Mixer-B: epochs 300 | lr 0.001 | wd 0.1 | RandAug. 10 | Mixup 0.2 | Dropout 0.0 | Stoch. depth 0.1
  Mixer-L: epochs 300 | lr 0.001 | wd 0.1 | RandAug. 20 | Mixup 0.5 | Dropout 0.0 | Stoch. depth 0.1

Everything else as for ImageNet-1k (configs/imagenet1k_pretrain.py, whose docstring
explains the conventions): Adam (0.9, 0.999), batch 4096, clipping at global norm 1,
10k warmup steps then linear decay, 224 px, Inception crop + flip, RandAugment with
2 layers (Appendix B: "we always use two augmentations layers"), decoupled weight
decay, bf16 compute with float32 parameters.

Argument: the variant, `B/16` (default), `B/32`, `L/16` or `L/32` (Table 4 has
ImageNet-21k rows only for Mixer-B and Mixer-L).

Expected result (paper Table 3, "Pre-trained on ImageNet-21k (with extra
regularization)", after fine-tuning on ImageNet-1k at 224):
  Mixer-B/16: 80.64% top-1, ReaL 85.80.   Mixer-L/16: 82.89% top-1, ReaL 87.54
  (83.91% when fine-tuned at 448).
Those numbers need a fine-tuning run on ImageNet-1k after this one; this config only
pre-trains and reports accuracy on a held-out part of ImageNet-21k.

Loss: the paper does not say. This config uses the per-class sigmoid cross-entropy
(ImageNet-21k images often fit several of its overlapping classes) with the head bias
at -10.0 ~ log(1 / 21,843), the prior of each of the released checkpoints' 21,843
classes. --config.loss=softmax --config.head_bias_init=0 is the alternative.

Data: there is no public TFDS builder for ImageNet-21k. Extract the release into one
folder per class (root/<wnid>/<image>.JPEG) and pass
--config.dataset=folder:/data/imagenet21k; the class count is read from the folder.
It has no validation split, so the first 50,000 images of the folder's fixed,
class-interleaved order are held out for evaluation (eval_split "train[:50000]",
train_split "train[50000:]"). The default dataset name, "imagenet21k", only works
with a TFDS builder of that name that you registered yourself.

Length: the full (fall 2011) release has about 14.2M images; 300 epochs at batch 4096
is about 1.04M steps (the trainer computes the exact number from the data).

Commands (see configs/imagenet1k_pretrain.py for the GPU / gradient-accumulation
variants; the flags are the same):

  launch/tpu_pod.sh all --name mixer-l16-21k --zone us-central2-b \
      --accelerator-type v4-128 --spot --workdir gs://BUCKET/mixer_l16_i21k \
      -- --config=configs/imagenet21k_pretrain.py:L/16 \
         --config.dataset=folder:/mnt/imagenet21k

  python -m mixer_jax.main --config=configs/imagenet21k_pretrain.py:B/16 \
      --workdir=/ckpt/mixer_b16_i21k --config.dataset=folder:/data/imagenet21k \
      --config.grad_accum_steps=16
"""

from configs import common
from configs import imagenet1k_pretrain

# Table 4, ImNet-21k rows: size -> (RandAugment magnitude, mixup alpha).
TABLE4_I21K = {"B": (10, 0.2), "L": (20, 0.5)}
HOLDOUT = 50_000


def get_config(arg=None):
  variant = imagenet1k_pretrain.parse_variant(arg, config_name="imagenet21k_pretrain")
  randaug_magnitude, mixup_alpha = TABLE4_I21K[variant.split("/")[0]]
  c = common.base_config()

  # Data: a held-out prefix of the (class-interleaved) train split is the eval set.
  c.dataset = "imagenet21k"
  c.train_split = f"train[{HOLDOUT}:]"
  c.eval_split = f"train[:{HOLDOUT}]"
  c.num_classes = 0  # From the dataset (21,843 for the released checkpoints' version).
  c.image_size = 224
  c.train_crop = "inception"
  c.train_flip = True
  c.randaugment_layers = 2
  c.randaugment_magnitude = randaug_magnitude
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
  c.head_bias_init = -10.0
  c.label_smoothing = 0.0
  c.mixup_alpha = mixup_alpha

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
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2_000
  return c
