r"""Top-k predictions of a Mixer checkpoint on image files.

  python -m mixer_jax.predict --checkpoint=PATH [--top_k=5] [--image_size=N] IMAGE [...]

PATH is a released-layout `.npz`, a timm-layout `.safetensors` (what
`export --format=timm` writes) or a training workdir / `checkpoints/<step>` of this
codebase (read with `weights.load_params`, which checks a file's every key, shape
and dtype before anything is compiled).

Preprocessing (kept simple, as in the released fine-tuning code's evaluation): the
pipelines' own decode (datasets/decode.py: the same pixels as training and evaluate),
resize straight to image_size x image_size (bilinear, no aspect-preserving crop), scale
to [-1, 1]. `--image_size` defaults to the
checkpoint's resolution; a token-mixing model only runs at that resolution, so another
value is refused.

Class names: the checkpoint's own `class_names` when it has them; otherwise, for a
1000-class head, the ImageNet-1k names shipped inside the installed
tensorflow-datasets package (read offline from its files: human-readable names from
`datasets/siscore/labels.py` (`IMAGENET_LABELS_LIST`), else the WordNet synset ids of
`datasets/imagenet2012/labels.txt`, both in TFDS label order); otherwise "class_<i>".

Output: per image, the top-k classes with softmax probabilities; the last stdout line
is one JSON object
  {"predictions": [{"image": PATH, "top_k": [{"label": i, "name": ..., "prob": p}]}]}
"""

import ast
import functools
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from absl import app, flags, logging
import jax
import jax.numpy as jnp

from mixer_jax import errors
from mixer_jax import paths
from mixer_jax import state
from mixer_jax.datasets import decode
from mixer_jax import weights

BATCH_SIZE = 32


def _tfds_root() -> Optional[str]:
  """The installed tensorflow_datasets package directory, without importing it."""
  try:
    spec = importlib.util.find_spec("tensorflow_datasets")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def _human_imagenet_names(root: str) -> Optional[List[str]]:
  path = os.path.join(root, "datasets", "siscore", "labels.py")
  try:
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in tree.body:
      if (isinstance(node, ast.Assign) and len(node.targets) == 1 and
          getattr(node.targets[0], "id", None) == "IMAGENET_LABELS_LIST"):
        names = ast.literal_eval(node.value)
        if len(names) == 1000 and all(isinstance(n, str) for n in names):
          return list(names)
  except (OSError, SyntaxError, ValueError):
    pass
  return None


def _synset_imagenet_names(root: str) -> Optional[List[str]]:
  for rel in (("datasets", "imagenet2012", "labels.txt"),
              ("image_classification", "imagenet2012_labels.txt")):
    try:
      with open(os.path.join(root, *rel)) as f:
        names = [line.strip() for line in f if line.strip()]
    except OSError:
      continue
    if len(names) == 1000:
      return names
  return None


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> Optional[List[str]]:
  """ImageNet-1k class names in TFDS label order (human-readable if shipped), or None."""
  root = _tfds_root()
  if root is None:
    return None
  return _human_imagenet_names(root) or _synset_imagenet_names(root)


def class_names(info: Dict[str, Any], num_classes: int) -> List[str]:
  names = info.get("class_names")
  if names:
    if len(names) == num_classes:
      return [str(n) for n in names]
    logging.warning("Checkpoint has %d class names for %d classes; ignoring them.",
                    len(names), num_classes)
  if num_classes == 1000:
    names = imagenet_class_names()
    if names:
      return list(names)
  return [f"class_{i}" for i in range(num_classes)]


def load_image(path: str, image_size: int) -> np.ndarray:
  """(image_size, image_size, 3) float32 in [-1, 1]: the pipelines' decode and resize
  (datasets/decode.py), so a file gives the pixels training and evaluation see;
  errors.DataError if unreadable."""
  try:
    pixels = decode.load_rgb(path)
  except ValueError as e:
    raise errors.DataError(str(e)) from None
  return decode.resize(pixels, image_size).numpy().astype(np.float32) / 127.5 - 1.0


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def predict(checkpoint_path: str, image_paths: Sequence[str], top_k: int = 5,
            image_size: Optional[int] = None) -> Dict[str, Any]:
  """Runs the checkpoint on the images; returns {"predictions": [...]} (see module doc)."""
  if not image_paths:
    raise errors.ConfigError("No images given; pass one or more image files after the flags.")
  if top_k < 1:
    raise errors.ConfigError(f"--top_k={top_k} must be at least 1.")
  params, info = weights.load_params(checkpoint_path)
  num_classes = int(info.get("num_classes") or 0)
  if num_classes <= 0:
    raise errors.CheckpointError(f"{checkpoint_path} has no classification head (a features model), "
                       "so it cannot predict classes.")
  patch = int(info["model"]["patch_size"])
  num_tokens = weights.describe(params)["num_tokens"]
  native = info.get("image_size")
  size = int(image_size or native or 0)
  if size <= 0:
    raise errors.CheckpointError(f"{checkpoint_path} does not record its image size; pass --image_size.")
  if size % patch or (size // patch) ** 2 != num_tokens:
    raise errors.CheckpointError(
        f"--image_size={size} does not match the checkpoint, whose token-mixing layers "
        f"need {num_tokens} tokens of {patch}x{patch} px (image size {native or 'unknown'}).")
  images = np.stack([load_image(p, size) for p in image_paths])  # Fail fast on bad files.

  model = state.inference_model(info, num_classes)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  params = jax.tree_util.tree_map(jnp.asarray, params)
  logits = np.concatenate([
      np.asarray(apply(params, jnp.asarray(images[i:i + BATCH_SIZE])))
      for i in range(0, len(images), BATCH_SIZE)])
  probs = softmax(logits)
  names = class_names(info, num_classes)
  k = min(top_k, num_classes)
  predictions = []
  for path, p in zip(image_paths, probs):
    order = np.argsort(-p, kind="stable")[:k]
    predictions.append({"image": path, "top_k": [
        {"label": int(i), "name": names[i], "prob": float(p[i])} for i in order]})
  return {"predictions": predictions}


FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags (only when run as a program, so that importing this
  module next to other CLIs' modules does not clash on flag names)."""
  flags.DEFINE_string("checkpoint", None,
                      "Released .npz, timm .safetensors, or training workdir / step dir.")
  flags.DEFINE_integer("top_k", 5, "Number of classes to print per image.")
  flags.DEFINE_integer("image_size", None, "Input side in pixels (default: the checkpoint's).")


def main(argv):
  if not FLAGS.checkpoint:
    print("--checkpoint is required; pass a .npz file or a training workdir.", file=sys.stderr)
    sys.exit(2)
  try:
    result = predict(paths.resolve(FLAGS.checkpoint), argv[1:], FLAGS.top_k, FLAGS.image_size)
  except (errors.ConfigError, errors.DataError, errors.CheckpointError) as e:
    print(str(e), file=sys.stderr)
    sys.exit(2)
  for pred in result["predictions"]:
    print(pred["image"])
    for rank, entry in enumerate(pred["top_k"], 1):
      print(f"  {rank}. {entry['prob']:.4f}  {entry['name']} (label {entry['label']})")
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
