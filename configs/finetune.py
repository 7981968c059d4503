r"""Fine-tuning a pre-trained Mixer (paper Appendix B): `configs/finetune.py:DATASET`.

DATASET: imagenet2012, cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
mixer_fashion_mnist or folder:/path. Model and resolution come from config.init_from (a
released .npz or our workdir). Recipe: momentum SGD 0.9, batch 512, clip 1, warmup then
cosine, no weight decay, lr 0.03 (the paper sweeps 0.003-0.06); 20k steps on ImageNet,
10k on CIFAR and Fashion-MNIST, 500 on Pets, Flowers and folders. Expected: Table 3
(B/16 from ImageNet-21k: 80.64% on ImageNet); CIFAR: 10k steps of 512 images on one
accelerator. Splits, the head, 448 px (Appendix C): docs/recipes.md.

  python -m mixer_jax.main --config=configs/finetune.py:cifar10 \
      --config.init_from=Mixer-B_16.npz --workdir=/tmp/ft_cifar10
"""

import os

from configs import common

# name: (train split, eval split, steps, warmup steps).
DATASETS = {
    "imagenet2012": ("train", "validation", 20_000, 500),
    "cifar10": ("train", "test", 10_000, 500),
    "cifar100": ("train", "test", 10_000, 500),
    "oxford_iiit_pet": ("train", "test", 500, 100),
    "oxford_flowers102": ("train", "test", 500, 100),
    "mixer_fashion_mnist": ("train", "test", 10_000, 500),
}
FOLDER = "folder:"
FOLDER_STEPS = (500, 100)


def folder_splits(root: str):
  """(train, eval) splits of a class-per-subfolder dataset (see datasets/folder.py)."""
  names = {n.lower() for n in os.listdir(root)} if os.path.isdir(root) else set()
  if "validation" in names or "val" in names:
    return "train", "validation"
  if "test" in names:
    return "train", "test"
  return "train[:90%]", "train[90%:]"


def get_config(dataset: str = "cifar10"):
  c = common.base_config()
  c.dataset = dataset = dataset.strip()
  if dataset.startswith(FOLDER):
    c.train_split, c.eval_split = folder_splits(dataset[len(FOLDER):])
    c.num_train_steps, c.warmup_steps = FOLDER_STEPS
  elif dataset in DATASETS:
    c.train_split, c.eval_split, c.num_train_steps, c.warmup_steps = DATASETS[dataset]
  else:
    raise ValueError(
        f"Unknown fine-tuning dataset {dataset!r}; use one of {', '.join(DATASETS)} or "
        "folder:/path (for another TFDS dataset start from one of them and set "
        "--config.dataset, --config.train_split and --config.eval_split).")
  c.model.variant = ""          # "" = init_from's architecture.
  c.image_size = 0              # 0 = init_from's resolution.
  c.eval_preprocess = "resize"  # As the released fine-tuning code.
  c.log_image_grid, c.log_every_steps, c.eval_every_steps = False, 50, 1_000
  c.optimizer, c.learning_rate, c.lr_decay, c.batch_size = "sgd", 0.03, "cosine", 512
  return c
