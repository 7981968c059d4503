"""Datasets by name: the one table of how a TFDS dataset that is not prepared yet
gets prepared.

`config.dataset` is a TFDS name (our own builders included) or `folder:/path`
(folder.py, read by input_pipeline directly). A TFDS name is looked up in `PREPARE`
by its full name, then by its base name (`imagenet2012` for `imagenet2012:5.1.0`);
a name in neither is refused with the `tfds build` command that prepares it
elsewhere. To add a dataset, register a TFDS builder in a module here and add one
row to the table.
"""

import os

import tensorflow_datasets as tfds

from mixer_jax import errors
# Importing these registers their builders (`mixer_digits`, `mixer_fashion_mnist`).
from mixer_jax.datasets import digits
from mixer_jax.datasets import fashion_mnist


def builder(name: str, data_dir: str = ""):
  """The TFDS builder for `name` (ours registered), unprepared or prepared."""
  return tfds.builder(name, data_dir=data_dir or None)


def _build_offline(builder, name: str, manual_dir: str) -> None:
  del name, manual_dir  # The data ships with a Python package: nothing to fetch.
  builder.download_and_prepare()


def _from_local_idx(builder, name: str, manual_dir: str) -> None:
  del name
  fashion_mnist.download_and_prepare(builder, manual_dir)


def _from_manual_dir(hint: str):
  """TFDS's manual preparation from files the user downloads into the manual dir."""
  def prepare(builder, name: str, manual_dir: str) -> None:
    where = builder.data_dir
    # TFDS's own default: DATA_DIR/downloads/manual; `where` is DATA_DIR/name[/config]/version.
    root = where
    for _ in range(3 if builder.builder_config else 2):
      root = os.path.dirname(root)
    manual = manual_dir or os.path.join(root, "downloads", "manual")
    if not os.path.isdir(manual) or not os.listdir(manual):
      raise errors.DataError(f"TFDS dataset {name} is not prepared in {where}; "
                             f"{hint}, here {manual}, and run again.")
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except Exception as e:  # Truncated or misnamed tars: TFDS's own errors are deep.
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise errors.DataError(f"TFDS could not prepare {name} from the manual dir {manual} "
                             f"({type(e).__name__}: {reason}); {hint}, "
                             "complete and unmodified.") from e
  return prepare


def _use_local_fashion_mnist(builder, name: str, manual_dir: str) -> None:
  del name, manual_dir
  raise errors.DataError(f"TFDS dataset fashion_mnist is not prepared in {builder.data_dir} "
                         "and would need a download; use --config.dataset="
                         f"{fashion_mnist.NAME}, which prepares it from local IDX files "
                         f"({fashion_mnist.PACKAGE_HINT}).")


def _needs_internet(builder, name: str, manual_dir: str) -> None:
  del manual_dir
  raise errors.DataError(f"TFDS dataset {name} is not prepared in {builder.data_dir}; "
                         f"prepare it on a machine with internet (`tfds build {name} "
                         "--data_dir=DIR`) and point config.data_dir at DIR.")


# name (full, or the base before `/` and `:`) -> prepare(builder, name, manual_dir).
PREPARE = {
    digits.NAME: _build_offline,
    fashion_mnist.NAME: _from_local_idx,
    "imagenet2012": _from_manual_dir(
        "put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual dir "
        "(config.manual_dir, default DATA_DIR/downloads/manual)"),
    "fashion_mnist": _use_local_fashion_mnist,
}


def prepare(builder, name: str, manual_dir: str = "") -> None:
  """Prepares `builder` (the TFDS dataset `name`) as its row in PREPARE says, or
  refuses it in one sentence."""
  base = name.split("/")[0].split(":")[0]
  how = PREPARE.get(name) or PREPARE.get(base) or _needs_internet
  how(builder, name, manual_dir)
