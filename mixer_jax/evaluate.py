r"""Evaluates a Mixer checkpoint on a classification dataset: top-1, top-5, loss.

  python -m mixer_jax.evaluate --config=configs/finetune.py:imagenet2012 \
      --checkpoint=Mixer-B_16.npz --config.data_dir=DIR
  python -m mixer_jax.evaluate --config=configs/finetune.py:cifar10 \
      --checkpoint=/tmp/ft_cifar10 --fewshot --output=/tmp/ft_cifar10/eval.json

--checkpoint is a released-layout `.npz`, a timm-layout `.safetensors` (what
`export --format=timm` writes), a training workdir of this codebase or one of its
`checkpoints/<step>` directories (`weights.load_params`). The model is built
from the checkpoint (its size fields and head width), so the config's model section
does not matter; the config supplies the dataset and the evaluation preprocessing.

Datasets (`--config.dataset`):
- `imagenet2012`: the 50,000 validation images. TFDS prepares it offline from the two
  ILSVRC tar files in the manual dir (config.manual_dir, default
  DATA_DIR/downloads/manual).
- `imagenet2012_real`: the same images with the ReaL labels; `real_top1` is the
  accuracy over the images that have at least one ReaL label, a prediction counting
  as correct when it is any of them (`real_num_examples` of them); `top1` uses the
  original labels. TFDS prepares it from the val tar plus a download of the labels.
- `imagenet_v2` (test split), any other TFDS image classification dataset, or
  `folder:/path` (see datasets/folder.py).
The split is --split if given, else `validation` for imagenet2012(_real), `test` for
imagenet_v2 and config.eval_split otherwise.

Every example is counted exactly once on any number of devices and hosts: the last
batch is padded with masked examples, never dropped (evaluator.Evaluator).

Image size: the checkpoint's own (a token-mixing layer only runs at the token count
it was trained with). `--config.image_size` may name it explicitly; another value is
refused with the allowed size. To use a checkpoint at a higher resolution, fine-tune
it there first (configs/finetune.py; paper Appendix C).

Preprocessing (`config.eval_preprocess`), values scaled to [-1, 1] in both:
- "resize_crop" (default): shorter side to image_size / config.eval_crop_fraction
  (256 for 224) then the central image_size crop: the common ImageNet evaluation
  convention (Flax ImageNet example, most papers' tables).
- "resize": straight to image_size x image_size, as the released Mixer/ViT
  fine-tuning code evaluates: use it to reproduce numbers of checkpoints fine-tuned
  with that code.

--fewshot adds linear few-shot accuracies (fewshot.py: closed-form ridge regression on
the frozen pre-logits) for config.fewshot_shots examples per class drawn from
--fewshot_train_split (default config.train_split), tested on the evaluated split.
All features of that training split are held in host memory (D floats per image), so
give a slice for very large ones (e.g. `--fewshot_train_split=train[:10%]`).

Output: a summary line, then, as the last line on stdout, one JSON object
  {"dataset", "split", "num_examples", "top1", "top5", "loss", "checkpoint",
   "image_size", "eval_preprocess", "devices"[, "real_top1", "real_num_examples"]
   [, "fewshot_<n>shot" ...][, "class_names", "confusion", "class_top1", "most_confused"]}
(--confusion adds the last four: confusion[i][j] counts examples of class i predicted
as j; most_confused lists the five most frequent mistakes.)
(`top5` is null for fewer than 5 classes); --output=FILE writes the same object.
Problems a user can fix (missing checkpoint, class-count mismatch, unprepared
dataset, wrong image size) are one sentence on stderr and exit code 2.
"""

import json
import math
import os
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow_datasets as tfds

from configs import common

from mixer_jax import datasets
from mixer_jax import distributed
from mixer_jax import errors
from mixer_jax import evaluator
from mixer_jax import host_memory
from mixer_jax import input_pipeline
from mixer_jax import paths
from mixer_jax import sharding
from mixer_jax import state as state_lib
from mixer_jax import weights

# The split that holds the labelled evaluation images of datasets with a fixed one.
KNOWN_SPLITS = {"imagenet2012": "validation", "imagenet2012_real": "validation",
                "imagenet_v2": "test"}
# TFDS reads whatever the tar holds (a truncated tar gives fewer images, silently).
KNOWN_SIZES = {("imagenet2012", "validation"): 50_000,
               ("imagenet2012_real", "validation"): 50_000}


# ------------------------------------------------------------------ the checks
def default_split(config) -> str:
  base = config.dataset.split("/")[0].split(":")[0]
  return KNOWN_SPLITS.get(base, config.eval_split)


def resolve_image_size(path: str, info: Dict[str, Any], num_tokens: int,
                       requested: Optional[int]) -> int:
  """The checkpoint's image size; `requested` must equal it."""
  patch = int(info["model"]["patch_size"])
  side = math.isqrt(num_tokens)
  native = info.get("image_size") or (side * patch if side * side == num_tokens else None)
  size = int(requested or native or 0)
  if size <= 0:
    raise errors.CheckpointError(f"Checkpoint {path} does not record its image size; pass "
                        "--config.image_size.")
  if size % patch or (size // patch) ** 2 != num_tokens:
    raise errors.CheckpointError(
        f"--config.image_size={size} does not fit checkpoint {path}, whose token-mixing "
        f"layers take {num_tokens} tokens of {patch}x{patch} px, i.e. image size {native}; "
        f"evaluate at {native} (or leave image_size out), or fine-tune at {size} first "
        "(configs/finetune.py).")
  return size


def check_classes(path: str, checkpoint_classes: int, dataset: str, dataset_classes: int,
                  config_classes: int = 0) -> None:
  """The head must have one logit per dataset class (or config.num_classes if set)."""
  if checkpoint_classes <= 0:
    raise errors.CheckpointError(f"Checkpoint {path} has no classification head (a features model), "
                        "so it cannot be evaluated on labels; fine-tune it first "
                        "(configs/finetune.py).")
  if config_classes and config_classes < dataset_classes:
    raise errors.ConfigError(f"config.num_classes={config_classes} is smaller than the "
                        f"{dataset_classes} classes of {dataset}; set it to 0.")
  expected = config_classes or dataset_classes
  if checkpoint_classes != expected:
    what = (f"config.num_classes is {expected}" if config_classes else
            f"dataset {dataset} has {dataset_classes} classes")
    raise errors.CheckpointError(
        f"Checkpoint {path} has a {checkpoint_classes}-class head but {what}; evaluate it on "
        f"the dataset it was trained for, or fine-tune it on {dataset} first "
        "(configs/finetune.py).")


def check_class_names(path: str, checkpoint_names, dataset: str, dataset_names) -> None:
  """Labels are compared by index: a label must name the same class on both sides.

  Refused where they differ (other classes, or the same ones in another order); only
  a warning where one list merely extends the other (a head wider than the dataset).
  A released .npz records no class names, so exporting a workdir to one
  (`python -m mixer_jax.export --format=npz`) is the deliberate way past the check.
  """
  if not checkpoint_names or not dataset_names:
    return
  a, b = list(checkpoint_names), list(dataset_names)
  if a == b:
    return
  differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
  if not differ:
    logging.warning("Checkpoint %s names %d classes and %s %d, the same ones where both name "
                    "a label, so labels are compared by index.", path, len(a), dataset, len(b))
    return
  i = differ[0]
  what = ("orders the same classes differently from" if set(a) == set(b) else
          "names other classes than")
  raise errors.CheckpointError(
      f"Checkpoint {path} {what} dataset {dataset} (label {i} is {a[i]!r} in the checkpoint "
      f"but {b[i]!r} in the dataset), so its accuracy would count the wrong classes; evaluate "
      "on data with the checkpoint's classes in its order, or, if the labels do mean the same "
      "classes, export it to a .npz, which records no class names (python -m mixer_jax.export "
      f"--checkpoint={path} --format=npz --output=FILE.npz), and evaluate that.")


def _tfds_classes_before_preparing(config) -> Optional[int]:
  """Class count of a TFDS dataset from its builder alone (no preparation), or None.

  Preparing ImageNet takes hours; a 10-class checkpoint should be refused before.
  """
  if config.dataset.startswith(input_pipeline.FOLDER_PREFIX):
    return None
  try:
    features = datasets.builder(config.dataset, config.data_dir).info.features
    label = features["label"] if "label" in features else features["original_label"]
    return int(label.num_classes)
  except Exception:  # Unknown names and odd datasets: get_source says what is wrong.
    return None


# ---------------------------------------------------------------- evaluation
def evaluate(config, checkpoint_path: str, *, split: Optional[str] = None,
             image_size: Optional[int] = None, fewshot: bool = False,
             fewshot_train_split: Optional[str] = None,
             confusion: bool = False) -> Dict[str, Any]:
  """Evaluates `checkpoint_path` on config.dataset; returns the JSON-ready result.

  Args:
    config: a config from configs/ (dataset, data_dir, eval_preprocess,
      eval_batch_size, dtype, mesh, few-shot shots); its model sizes are ignored.
    checkpoint_path: released `.npz`, workdir or workdir/checkpoints/<step>.
    split: split to evaluate (default: see the module doc).
    image_size: must equal the checkpoint's image size if given (None: use it).
    fewshot: also report few-shot accuracies on pre-logits.
    fewshot_train_split: pool of the few-shot examples (default config.train_split).
    confusion: also report the confusion matrix, the most frequent mistakes and each
      class's accuracy.
  """
  state_lib.validate_config(config)
  params, info = weights.load_params(checkpoint_path)
  desc = weights.describe(params)
  size = resolve_image_size(checkpoint_path, info, desc["num_tokens"], image_size)
  num_classes = int(info.get("num_classes") or desc["num_classes"] or 0)
  early = _tfds_classes_before_preparing(config)
  if early is not None:
    check_classes(checkpoint_path, num_classes, config.dataset, early, config.num_classes)

  mesh = sharding.make_mesh(config.mesh_model)
  eval_batch = state_lib.eval_batch_size(config, mesh)
  source = input_pipeline.get_source(config)  # Prepares an offline-buildable dataset.
  input_pipeline.resolve_splits(config, source)  # The fine-tuning configs leave them "".
  split = split or default_split(config)
  fewshot_train_split = fewshot_train_split or config.train_split
  data = input_pipeline.dataset_info(source, [split] + ([fewshot_train_split] if fewshot else []))
  check_classes(checkpoint_path, num_classes, data.name, data.num_classes, config.num_classes)
  expected_size = KNOWN_SIZES.get((config.dataset, split))
  if expected_size and data.num_examples[split] != expected_size:
    logging.warning("%s %s has %d images, not the %d of the full split; the numbers are not "
                    "comparable to published ones (is the tar file complete?).", data.name,
                    split, data.num_examples[split], expected_size)
  check_class_names(checkpoint_path, info.get("class_names"), data.name, data.class_names)

  config = config.copy_and_resolve_references()
  config.image_size = size  # Preprocessing and the model's input shape read it.
  state_lib.resolve_from_weights(config, info, checkpoint_path)
  setup = state_lib.Setup(config, num_classes, mesh=mesh)
  logging.info("Evaluating %s (%s, %s params) on %s %s (%d examples) at %d px, %d devices.",
               checkpoint_path, info["model"], f"{setup.num_params:,}", data.name, split,
               data.num_examples[split], size, jax.device_count())
  params = setup.place_params(params)
  metrics = evaluator.Evaluator(setup.eval_step(confusion=confusion), config, source, split,
                                 num_classes, mesh, eval_batch)(params)

  result = {"dataset": data.name, "split": split,
            "num_examples": int(round(metrics["num_examples"])),
            "top1": metrics["accuracy"], "top5": metrics.get("top5"), "loss": metrics["loss"],
            "checkpoint": checkpoint_path, "image_size": size,
            "eval_preprocess": config.eval_preprocess, "devices": jax.device_count()}
  if "real_accuracy" in metrics:
    result["real_top1"] = metrics["real_accuracy"]
    result["real_num_examples"] = int(round(metrics["real_num_examples"]))
  if confusion:
    matrix = metrics["confusion"]
    names = data.class_names or [str(i) for i in range(num_classes)]
    result["class_names"] = names
    result["confusion"] = matrix.tolist()
    result["class_top1"] = {n: float(matrix[i, i] / max(matrix[i].sum(), 1))
                            for i, n in enumerate(names)}
    result["most_confused"] = [
        {"true": t, "predicted": p, "count": n, "share_of_true": s}
        for t, p, n, s in evaluator.most_confused(matrix, names)]
  if fewshot:
    features_params = {k: v for k, v in params.items() if k != "head"}
    result.update(evaluator.fewshot_metrics(setup.feature_model(), features_params, config, source,
                                             fewshot_train_split, split, data.num_classes,
                                             mesh, eval_batch))
  return result


def summary_line(result: Dict[str, Any]) -> str:
  fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"
  line = (f"{result['dataset']} {result['split']}: top-1 {fmt(result['top1'])}, top-5 "
          f"{fmt(result['top5'])}, loss {result['loss']:.4f} on {result['num_examples']} "
          "examples")
  if "real_top1" in result:
    line += f"; ReaL top-1 {fmt(result['real_top1'])} on {result['real_num_examples']}"
  if "most_confused" in result:
    line += "; most confused (true -> predicted): " + ", ".join(
        f"{m['true']} -> {m['predicted']} {m['count']} ({fmt(m['share_of_true'])})"
        for m in result["most_confused"])
  shots = [k for k in result if k.startswith("fewshot_")]
  if shots:
    line += "; few-shot " + ", ".join(f"{k[len('fewshot_'):]} {fmt(result[k])}" for k in shots)
  return line


# ----------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags():
  """Defined only when run as a program (no clash with other entry points' flags)."""
  config_flags.DEFINE_config_file("config", None, "Config file (path[:argument]).",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None,
                      "Released .npz, timm .safetensors, training workdir or step dir.")
  flags.DEFINE_string("split", "", "Split to evaluate (default: see the module doc).")
  flags.DEFINE_string("output", "", "Also write the JSON result to this file.")
  flags.DEFINE_bool("fewshot", False, "Also report few-shot accuracies on pre-logits.")
  flags.DEFINE_string("fewshot_train_split", "", "Few-shot pool (default config.train_split).")
  flags.DEFINE_bool("confusion", False,
                    "Also report the confusion matrix, most frequent mistakes, per-class top-1.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for clusters JAX does not detect.")
  flags.DEFINE_integer("num_processes", None, "Total processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors.")


def _run():
  if FLAGS.config is None:
    raise errors.ConfigError("Pass --config=CONFIG_FILE[:ARG] (e.g. configs/finetune.py:imagenet2012).")
  errors.require_config(FLAGS.config, FLAGS["config"].config_filename)
  errors.require_known_keys(FLAGS.config, common.base_config(),
                            FLAGS["config"].config_filename)
  if not FLAGS.checkpoint:
    raise errors.ConfigError("Pass --checkpoint=PATH: a .npz file or a training workdir.")
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  tfds.disable_progress_bar()
  # Only an explicit --config.image_size counts: config files carry a default size.
  requested = FLAGS.config.image_size if "image_size" in config_flags.get_override_values(
      FLAGS["config"]) else None
  paths.resolve_config(FLAGS.config)
  result = evaluate(FLAGS.config, paths.resolve(FLAGS.checkpoint), split=FLAGS.split or None,
                    image_size=requested, fewshot=FLAGS.fewshot,
                    fewshot_train_split=FLAGS.fewshot_train_split or None,
                    confusion=FLAGS.confusion)
  if jax.process_index() == 0:
    text = json.dumps(result)
    if FLAGS.output:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
      with open(FLAGS.output, "w") as f:
        f.write(text + "\n")
    print(summary_line(result))
    print(text, flush=True)


def main(argv):
  host_memory.keep_freed_memory()  # Before JAX starts its threads (host_memory.py).
  if len(argv) > 1:
    raise errors.usage(f"Unexpected arguments: {' '.join(argv[1:])}")
  errors.exit_on_ctrl_c("nothing written (the metrics and --output are written at the "
                        "end); the checkpoint is unchanged.")
  errors.run_guarded(_run, FLAGS.traceback)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
