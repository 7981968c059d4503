"""Small Mixer on the embedded 8x8 digits (scikit-learn's, 1,797 images): the demo job.

Patch 2 on 8x8 images -> 16 tokens, 4 blocks of width 64 (143,498 parameters); no flip
or crop (digits are not mirror-symmetric); Adam 3e-3, cosine, 600 steps of 128. No
download: the dataset is built offline from the copy inside scikit-learn.
Argument: the family, mixer (default), resmlp (resmlp_12's family, lr 1e-2, no weight
decay) or gmlp (gmlp_s16's family): same width, depth, patch, data and steps.

Expected: 98.03% test top-1 (355 images) in 33 s wall on the 2-core CPU; resmlp
97.75%, gmlp 98.31% (~40 s each). Other seeds and commits: docs/recipes.md.

  python -m mixer_jax.main --config=configs/default.py --workdir=/tmp/mixer_digits
  python -m mixer_jax.main --config=configs/default.py:resmlp --workdir=/tmp/resmlp_digits
  python -m mixer_jax.main --config=configs/default.py:gmlp --workdir=/tmp/gmlp_digits
"""

from configs import common

FAMILIES = ("mixer", "resmlp", "gmlp")


def get_config(family: str = "mixer"):
  if family not in FAMILIES:
    raise ValueError(f"Unknown family {family!r} in configs/default.py:{family}; use one of "
                     f"{', '.join(FAMILIES)}.")
  c = common.base_config()
  c.image_size = 8
  c.cache_train = True
  c.train_crop = "none"
  c.train_flip = False
  c.eval_preprocess = "resize"

  c.model.variant = "S/2"
  c.model.num_blocks = 4
  c.model.hidden_dim = 64
  c.model.tokens_mlp_dim = 64
  c.model.channels_mlp_dim = 256

  c.learning_rate = 3e-3
  c.weight_decay = 1e-4
  c.warmup_steps = 100
  c.lr_decay = "cosine"
  c.batch_size = 128
  c.num_train_steps = 600
  c.eval_every_steps = c.checkpoint_every_steps = 200
  if family != "mixer":  # Width, depth and patch as above; no token-MLP width.
    c.model.patch_size = 2
    c.model.tokens_mlp_dim = None
  if family == "resmlp":
    c.model.variant = "resmlp_12"
    c.learning_rate = 1e-2
    c.weight_decay = 0.0
  elif family == "gmlp":
    c.model.variant = "gmlp_s16"
  return c
