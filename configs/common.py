"""Every config key the trainer reads, with its default. Configs start from this.

Keys absent here are rejected on the command line by ml_collections, so a typo such
as `--config.batchsize=8` fails at once instead of being ignored. The keys stay flat
(`config.batch_size`); the section headers below only group them. Recipes (the other
files here) set what their paper or dataset changes; what a default is, and what a
recipe sets, is listed per config in docs/recipes.md.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  # Any TFDS dataset by name, or "folder:/path" (class-per-subfolder images).
  c.dataset = "mixer_digits"
  c.data_dir = ""               # TFDS data dir; "" = TFDS's default (~/tensorflow_datasets).
  c.manual_dir = ""             # TFDS manual dir (imagenet2012: the two ILSVRC tar files).
  c.train_split = "train"
  c.eval_split = "test"
  c.num_classes = 0             # 0 = read from the dataset.
  c.image_size = 224
  c.cache_train = False         # Keep decoded-free encoded training records in memory.
  c.skip_corrupt_images = False  # folder: datasets: skip (and count) undecodable files.
  c.train_crop = "inception"    # "inception" (random-resized crop) | "resize" | "pad" | "none".
  c.train_crop_padding = 4      # train_crop="pad": shift by up to this many pixels.
  c.train_flip = True
  c.randaugment_layers = 0      # Paper ImageNet-1k: 2.
  c.randaugment_magnitude = 0   # 0-30 scale; paper ImageNet-1k: 15.
  # Where flip and RandAugment run: "host" (tf.data, augment.py) or "device" (in the
  # jitted train step, randaugment.py; the host then only decodes, crops and resizes,
  # and ships uint8). "auto": "device" where JAX's backend is an accelerator, else
  # "host"; the run record holds the resolved value. The two draw different random
  # augmentations, so a resume that changes it is refused unless accepted.
  c.randaugment_on = "auto"
  c.eval_preprocess = "resize_crop"  # "resize_crop" (shorter side 256/224, central crop) | "resize".
  c.eval_crop_fraction = 0.875  # 224/256.
  c.log_image_grid = True       # TensorBoard grid of augmented training images at start.

  # Model: the module's fields by name (models.create_model). Unset (None) fields take
  # the preset's value; state.resolve_model fills them, the family and the name.
  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"      # A preset ("B/16", "resmlp_24", "gmlp_s16"); "" = init_from's.
  c.model.family = placeholder(str)  # "mixer" | "resmlp" | "gmlp"; the preset's if unset.
  c.model.name = placeholder(str)    # Derived (models.model_name), for the record.
  c.model.patch_size = placeholder(int)
  c.model.num_blocks = placeholder(int)
  c.model.hidden_dim = placeholder(int)
  c.model.tokens_mlp_dim = placeholder(int)    # Mixer only.
  c.model.channels_mlp_dim = placeholder(int)
  c.model.layerscale_init = placeholder(float)  # ResMLP only.
  c.model.approximate_gelu = placeholder(bool)  # ResMLP and gMLP: tanh GELU.
  c.model.stoch_depth = 0.0
  c.model.dropout = 0.0
  c.model.remat_policy = "none"  # Recompute blocks in backprop: "full", "dots_saveable", ...
  c.model.scan = False          # Blocks under nn.scan (faster compiles); params stacked.
  c.model.kernels = "auto"      # "auto" (by backend) | "xla" (plain flax) | "cpu" | "pallas".
  c.dtype = "float32"           # Compute dtype; "bfloat16" on accelerators. Params stay fp32.

  # Loss and regularisation.
  c.loss = "softmax"            # "softmax" | "sigmoid" (per-class binary cross-entropy).
  c.head_bias_init = 0.0        # -6.9 with the sigmoid loss (prior ~1/1000 per class).
  c.label_smoothing = 0.0
  c.mixup_alpha = 0.0           # Paper ImageNet-1k: 0.5.
  c.cutmix_alpha = 0.0          # CutMix Beta(a, a); with mixup on, one of the two per batch.

  # ----------------------------------------------------------- optimiser
  # optim.py: clip -> Adam or momentum SGD -> decoupled weight decay -> lr.
  c.optimizer = "adam"          # "adam" | "sgd" (momentum) | "lamb" (ResMLP's).
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.momentum = 0.9
  c.weight_decay = 0.0          # Decoupled, multiplied by the lr (AdamW); kernels only.
  c.grad_clip_norm = 1.0        # 0 = no clipping.

  # ------------------------------------------------------------ schedule
  c.learning_rate = 1e-3        # Peak, reached after the warmup.
  c.warmup_steps = 0            # Linear from 0; the paper's pre-training: 10,000.
  c.lr_decay = "linear"         # "linear" | "cosine" | "constant" after warmup.
  c.end_learning_rate = 0.0
  c.batch_size = 4096           # Global, over all processes and devices.
  c.grad_accum_steps = 1        # Micro-batches per update (batch_size / this each).
  c.num_train_steps = 0         # > 0 wins over num_epochs.
  c.num_epochs = 300.0

  # ----------------------------------------------------------------- run
  c.seed = 0
  c.eval_batch_size = 0         # 0 = batch_size / grad_accum_steps.
  c.log_every_steps = 100
  c.eval_every_steps = 5_000    # Also evaluates at the end.
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3
  c.nonfinite = "stop"          # "stop" (exit non-zero, keep last good checkpoint) | "skip".
  c.init_from = ""              # A released .npz or a workdir of ours (fine-tuning).
  # Few-shot linear probes on pre-logits during training (0 = off).
  c.fewshot_every_steps = 0
  c.fewshot_shots = (1, 5, 10)
  c.fewshot_train_split = ""    # Pool of the few-shot examples; "" = train_split.
  c.fewshot_layer = "pre_logits"  # Or "block_K": block K's tokens averaged (models.capture).
  # Scale-out (sharding.py).
  c.sharding = "replicate"      # "replicate" | "fsdp".
  c.mesh_model = 1              # Size of the second ("model") mesh axis.
  # Arrays with fewer elements stay replicated under fsdp. 2^16 shards the token-mixing
  # kernels of L/16 and H/14 too, so memory falls ~N-fold (README memory table).
  c.fsdp_min_size = 2 ** 16
  return c
