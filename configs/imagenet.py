"""ImageNet pre-training defaults: an alias of configs/imagenet1k_pretrain.py.

The paper's ImageNet-1k recipe (Table 4; that file has its values and the expected
76.44% top-1 of Mixer-B/16, docs/recipes.md the TPU / GPU commands). Same argument:

  python -m mixer_jax.main --config=configs/imagenet.py:B/16 --workdir=/ckpt/b16

is the same run as --config=configs/imagenet1k_pretrain.py:B/16.
"""

from configs import imagenet1k_pretrain


def get_config(arg=None):
  return imagenet1k_pretrain.get_config(arg)
