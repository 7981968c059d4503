r"""Fine-tuning a pre-trained Mixer on any dataset (paper Appendix B).

`configs/finetune.py:DATASET` or `--config.dataset=DATASET`: any TFDS name or
folder:/path. Model and resolution come from config.init_from (a released .npz, an
hf-hub: name or our workdir). Recipe: momentum SGD 0.9, batch 512, clip 1, warmup then
cosine, no weight decay, lr 0.03 (the paper sweeps 0.003-0.06). Splits: train, and
validation or test (a folder without split folders holds out 10%). Steps: 500 with 100
warmup, except the presets: 20k on imagenet2012, 10k on cifar10, cifar100 and
mixer_fashion_mnist (set --config.num_train_steps for another large dataset).
Expected: Table 3 (B/16 from ImageNet-21k: 80.64% on ImageNet). Details: docs/recipes.md.

  python -m mixer_jax.main --config=configs/finetune.py:cifar10 \
      --config.init_from=hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k --workdir=/tmp/ft
"""

from configs import common

# Presets, name: (steps, warmup steps). Every other dataset gets DEFAULT_STEPS.
DATASETS = {
    "imagenet2012": (20_000, 500),
    "cifar10": (10_000, 500),
    "cifar100": (10_000, 500),
    "mixer_fashion_mnist": (10_000, 500),
}
DEFAULT_STEPS = (500, 100)


def get_config(dataset: str = ""):
  c = common.base_config()
  c.dataset = dataset.strip()
  # "": the dataset's own splits (input_pipeline.resolve_splits), when the run starts.
  c.train_split = c.eval_split = ""
  c.num_train_steps, c.warmup_steps = DATASETS.get(c.dataset, DEFAULT_STEPS)
  c.model.variant = ""          # "" = init_from's architecture.
  c.image_size = 0              # 0 = init_from's resolution.
  c.eval_preprocess = "resize"  # As the released fine-tuning code.
  c.log_image_grid, c.log_every_steps, c.eval_every_steps = False, 50, 1_000
  c.optimizer, c.learning_rate, c.lr_decay, c.batch_size = "sgd", 0.03, "cosine", 512
  return c
