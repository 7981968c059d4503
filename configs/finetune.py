r"""Fine-tuning a pre-trained Mixer (paper Appendix B): `configs/finetune.py:DATASET`.

DATASET is one of imagenet2012, cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
mixer_fashion_mnist (offline, see README "Real data") or folder:/path/to/images. The checkpoint comes in through `config.init_from` (a
released `.npz` or a workdir of this codebase):

  python -m mixer_jax.main --config=configs/finetune.py:cifar10 \
      --config.init_from=Mixer-B_16.npz --workdir=/tmp/ft_cifar10
  python -m mixer_jax.main --config=configs/finetune.py:folder:/data/flowers \
      --config.init_from=/tmp/my_pretraining_workdir --workdir=/tmp/ft_flowers
  python -m mixer_jax.evaluate --config=configs/finetune.py:cifar10 --checkpoint=/tmp/ft_cifar10

Recipe (paper Appendix B; steps and warmup as in the released fine-tuning code):
momentum SGD 0.9, batch 512, gradient clipping at global norm 1, linear warmup then
cosine decay, no weight decay, learning rate 0.03 (the paper sweeps {0.003, 0.01,
0.03, 0.06}: `--config.learning_rate=0.01`). 20k steps with 500 warmup on ImageNet,
10k with 500 warmup on CIFAR and Fashion-MNIST, 500 with 100 warmup on Pets, Flowers and folders.
Inception crop + horizontal flip for training; no RandAugment, mixup, dropout or
stochastic depth. Evaluation resizes straight to the image size
(`eval_preprocess="resize"`), as the released fine-tuning code does.

Model: taken from the checkpoint (`config.model.variant=""` and `image_size=0` mean
"init_from's"): a released file's sizes are read from its arrays, a workdir's from its
record, so nothing is re-typed. Setting a variant or size field checks it against the
checkpoint instead, and a mismatch is one sentence naming both values, before anything
runs. The head is re-initialised (zero kernel) when the dataset's class
count differs from the checkpoint's (`weights.load_pretrained`); a checkpoint with
the dataset's own class count keeps its head.

Resolution: the checkpoint's (224 for the released files). `--config.image_size=448`
fine-tunes at 448 px: the
token-mixing MLPs start block-diagonal, as K^2 = 4 copies of the 224-px ones
(paper Appendix C, resolution.py); any integer multiple of the checkpoint's side works.

Splits: imagenet2012 train/validation; cifar10, cifar100, oxford_iiit_pet,
oxford_flowers102, mixer_fashion_mnist train/test; folder:PATH train/validation (or train/test) when it
has those subfolders, else train[:90%] / train[90%:].
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
    # Fashion-MNIST from local IDX files (datasets/fashion_mnist.py): CIFAR's schedule.
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
  dataset = dataset.strip()
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
  c.dataset = dataset

  c.model.variant = ""          # "" = init_from's architecture.
  c.model.stoch_depth = 0.0
  c.model.dropout = 0.0
  c.image_size = 0              # 0 = init_from's resolution.
  c.train_crop = "inception"
  c.train_flip = True
  c.randaugment_layers = 0
  c.mixup_alpha = 0.0
  c.label_smoothing = 0.0
  c.eval_preprocess = "resize"
  c.log_image_grid = False

  c.optimizer = "sgd"
  c.momentum = 0.9
  c.learning_rate = 0.03
  c.lr_decay = "cosine"
  c.end_learning_rate = 0.0
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.batch_size = 512

  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 1_000
  return c
