"""configs/: the paper's pre-training recipes (Table 4, imagenet1k_pretrain.py,
imagenet21k_pretrain.py and the imagenet.py alias) and the fine-tuning recipe per
dataset (finetune.py, Appendix B), including `--config=configs/finetune.py:folder:/path`
on the command line."""

import math
import pathlib
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from configs import common
from configs import finetune
from configs import imagenet
from configs import imagenet1k_pretrain
from configs import imagenet21k_pretrain
from mixer_jax import models
from mixer_jax import train
from mixer_jax import state as state_lib

# ------------------------------------------------------------- pre-training
# Paper (arXiv 2105.01601) Table 4 and Section 3, written here independently of the
# config files: (RandAugment magnitude, mixup) per dataset and size; the rest shared.
TABLE4 = {("i1k", "B"): (15, 0.5), ("i1k", "L"): (15, 0.5),
          ("i21k", "B"): (10, 0.2), ("i21k", "L"): (20, 0.5)}
SHARED = dict(num_epochs=300, learning_rate=0.001, weight_decay=0.1, dropout=0.0,
              stoch_depth=0.1, optimizer="adam", b1=0.9, b2=0.999, grad_clip_norm=1.0,
              warmup_steps=10_000, lr_decay="linear", batch_size=4096, image_size=224,
              randaugment_layers=2, train_crop="inception", train_flip=True)
CONFIGS = {"i1k": imagenet1k_pretrain, "i21k": imagenet21k_pretrain}


@pytest.mark.parametrize("data,variant", [("i1k", "B/16"), ("i1k", "L/16"), ("i1k", "B/32"),
                                          ("i21k", "B/16"), ("i21k", "L/16"), ("i21k", "L/32")])
def test_configs_hold_the_paper_table4_values(data, variant):
  c = CONFIGS[data].get_config(variant)
  magnitude, mixup_alpha = TABLE4[(data, variant[0])]
  assert c.model.variant == variant
  assert c.randaugment_magnitude == magnitude
  assert c.mixup_alpha == mixup_alpha
  got = dict(num_epochs=c.num_epochs, learning_rate=c.learning_rate,
             weight_decay=c.weight_decay, dropout=c.model.dropout,
             stoch_depth=c.model.stoch_depth, optimizer=c.optimizer, b1=c.b1, b2=c.b2,
             grad_clip_norm=c.grad_clip_norm, warmup_steps=c.warmup_steps,
             lr_decay=c.lr_decay, batch_size=c.batch_size, image_size=c.image_size,
             randaugment_layers=c.randaugment_layers, train_crop=c.train_crop,
             train_flip=c.train_flip)
  assert got == SHARED
  # Decay to zero, the trainer derives the steps from 300 epochs, global batch kept.
  assert c.end_learning_rate == 0.0 and c.num_train_steps == 0 and c.grad_accum_steps == 1
  assert c.dtype == "bfloat16" and c.loss == "sigmoid"
  state_lib.validate_config(c)
  # Every key is one the trainer knows (configs only set keys of the base config).
  assert set(c.keys()) == set(common.base_config().keys())


def test_imagenet1k_config_data_eval_and_length():
  c = imagenet1k_pretrain.get_config()  # Default variant: B/16.
  assert c.model.variant == "B/16"
  assert (c.dataset, c.train_split, c.eval_split) == ("imagenet2012", "train", "validation")
  assert c.eval_preprocess == "resize_crop" and c.eval_crop_fraction == 0.875
  assert c.head_bias_init == pytest.approx(math.log(1 / 1000), abs=0.01)
  # ImageNet-1k train: 1,281,167 images; 300 epochs at 4096 -> ~93.8k steps.
  assert train.total_train_steps(c, 1_281_167) == 93_835
  # Paper-size model (Table 1 / REFERENCE.md count), from shapes only.
  model = state_lib.build_model(c, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == 59_880_472


def test_imagenet21k_config_holds_out_eval_images():
  c = imagenet21k_pretrain.get_config("L/16")
  assert c.eval_split == "train[:50000]" and c.train_split == "train[50000:]"
  assert c.head_bias_init == pytest.approx(math.log(1 / 21_843), abs=0.01)


def test_imagenet_config_is_the_imagenet1k_recipe():
  assert imagenet.get_config().to_dict() == imagenet1k_pretrain.get_config().to_dict()
  assert imagenet.get_config("L/16").to_dict() == imagenet1k_pretrain.get_config("L/16").to_dict()


@pytest.mark.parametrize("module", [imagenet1k_pretrain, imagenet21k_pretrain, imagenet])
@pytest.mark.parametrize("arg", ["S/16", "H/14", "B16", "X/16"])
def test_configs_reject_unknown_variants_in_one_sentence(module, arg):
  with pytest.raises(ValueError, match=r"^Unknown variant .*use one of B/16, B/32, L/16, L/32"
                     ) as info:
    module.get_config(arg)
  assert "\n" not in str(info.value)


# -------------------------------------------------------------- fine-tuning
def test_finetune_recipe_for_any_dataset():
  expected = {"imagenet2012": (20_000, 500), "cifar10": (10_000, 500),
              "cifar100": (10_000, 500), "mixer_fashion_mnist": (10_000, 500),
              "oxford_iiit_pet": (500, 100), "mixer_digits": (500, 100),
              "folder:/data/x": (500, 100), "": (500, 100)}
  for name, (steps, warmup) in expected.items():
    c = finetune.get_config(name)
    # The architecture, resolution and splits come from init_from and the dataset.
    assert (c.model.variant, c.image_size, c.train_split, c.eval_split) == ("", 0, "", "")
    c.model.variant, c.image_size = "B/16", 224
    state_lib.validate_config(c)
    assert c.dataset == name and (c.num_train_steps, c.warmup_steps) == (steps, warmup)
    # Paper Appendix B.
    assert (c.optimizer, c.momentum, c.batch_size, c.grad_clip_norm) == ("sgd", 0.9, 512, 1.0)
    assert (c.lr_decay, c.weight_decay, c.learning_rate) == ("cosine", 0.0, 0.03)
    assert (c.train_crop, c.train_flip) == ("inception", True)
    assert c.randaugment_layers == 0 and c.mixup_alpha == 0 and c.model.stoch_depth == 0


def test_empty_splits_resolve_from_the_dataset(tmp_path):
  """train + validation (or test) when the dataset has them, else a 90/10 slice."""
  import types
  from mixer_jax import errors, input_pipeline

  def resolved(names, train="", evaluate=""):
    c = ml_collections.ConfigDict(dict(train_split=train, eval_split=evaluate))
    input_pipeline.resolve_splits(c, types.SimpleNamespace(name="d", split_names=names))
    return c.train_split, c.eval_split

  assert resolved(["train", "validation", "test"]) == ("train", "validation")
  assert resolved(["test", "train"]) == ("train", "test")
  assert resolved(["train"]) == ("train[:90%]", "train[90%:]")
  assert resolved(["train", "test"], evaluate="train[:10]") == ("train", "train[:10]")
  assert resolved(["train"], "train[:50%]", "train[50%:]") == ("train[:50%]", "train[50%:]")
  with pytest.raises(errors.DataError, match="has only a train split"):
    resolved(["train"], train="train")
  with pytest.raises(errors.DataError, match="has no train split"):
    resolved(["test"])


def test_finetune_command_line_argument_with_colon(tmp_path, monkeypatch):
  """`--config=configs/finetune.py:folder:/path`: everything after the first colon."""
  argv = ["prog", f"--config={REPO}/configs/finetune.py:folder:{tmp_path}",
          "--config.init_from=Mixer-B_16.npz", "--config.learning_rate=0.01"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from there.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
  flag_values(argv)
  c = flag_values.config
  assert c.dataset == f"folder:{tmp_path}" and c.init_from == "Mixer-B_16.npz"
  assert c.learning_rate == 0.01 and c.eval_split == ""  # The dataset's, at the start.


# ------------------------------------------------------ ResMLP and gMLP recipes
def test_resmlp_and_gmlp_recipes_and_digits_demos():
  from configs import default, gmlp_imagenet1k, resmlp_imagenet1k
  res, gm = resmlp_imagenet1k.get_config(), gmlp_imagenet1k.get_config("gmlp_b16")
  # ResMLP: LAMB; gMLP: DeiT's recipe (AdamW 5e-4 x 1024 / 512, wd 0.05, mixup + CutMix).
  assert (res.optimizer, res.learning_rate, res.weight_decay, res.num_epochs) == (
      "lamb", 5e-3, 0.2, 400.0)
  assert (gm.optimizer, gm.learning_rate, gm.weight_decay, gm.num_epochs) == (
      "adam", 1e-3, 0.05, 300.0)
  for c in (res, gm):
    assert (c.mixup_alpha, c.cutmix_alpha, c.label_smoothing, c.batch_size) == (
        0.8, 1.0, 0.1, 1024)
    assert c.warmup_steps == 6_255 and c.lr_decay == "cosine"  # 5 epochs.
    state_lib.validate_config(c)
    assert set(c.keys()) == set(common.base_config().keys())
  assert state_lib.model_fields(gm)["hidden_dim"] == 512
  model = state_lib.build_model(res, 1000)
  assert models.count_params(models.param_shapes(model, 224)) == 15_350_872
  with pytest.raises(ValueError, match="^Unknown variant 'B/16' for configs/gmlp"):
    gmlp_imagenet1k.get_config("B/16")
  # The digits demos of the two families (README): patch 2, 4 blocks of width 64.
  for family, variant in (("resmlp", "resmlp_12"), ("gmlp", "gmlp_s16")):
    c = default.get_config(family)
    assert c.model.variant == variant and state_lib.size_fields(c) == dict(
        patch_size=2, num_blocks=4, hidden_dim=64, channels_mlp_dim=256)
  assert default.get_config().model.variant == "S/2"


# ---------------------------------------------------------------- real data
def test_fashion_mnist_configs():
  from configs import fashion_mnist
  short, long = fashion_mnist.get_config(), fashion_mnist.get_config("long")
  for c in (short, long):
    state_lib.validate_config(c)
    assert set(c.keys()) == set(common.base_config().keys())
    assert (c.dataset, c.image_size, c.eval_split, c.train_flip) == (
        "mixer_fashion_mnist", 28, "test", True)
    assert c.model.patch_size == 4  # 7 x 7 tokens.
  assert (short.train_crop, short.train_crop_padding) == ("pad", 1)
  assert (long.train_crop, long.train_crop_padding) == ("pad", 2)
  assert long.num_epochs > short.num_epochs
  with pytest.raises(ValueError, match=r"^Unknown setting 'x' in configs/fashion_mnist.py:x"):
    fashion_mnist.get_config("x")


# ------------------------------------------------------------- inheritance
def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    out.update(_flat(value, f"{prefix}{key}.") if hasattr(value, "items")
               else {prefix + key: value})
  return out


def _differs(child, parent):
  a, b = _flat(child), _flat(parent)
  return {k for k in a if a[k] != b[k]}


def test_imagenet21k_is_imagenet1k_plus_its_table4_rows():
  for variant in imagenet1k_pretrain.VARIANTS:
    differs = _differs(imagenet21k_pretrain.get_config(variant),
                       imagenet1k_pretrain.get_config(variant))
    # Mixer-L's mixup is 0.5 on both datasets, so it is not among L's differences.
    assert differs - {"mixup_alpha"} == {
        "dataset", "train_split", "eval_split", "randaugment_magnitude", "head_bias_init",
        "eval_every_steps", "checkpoint_every_steps"}


def test_resmlp_and_gmlp_are_the_deit_recipe_plus_what_their_papers_change():
  from configs import deit, gmlp_imagenet1k, resmlp_imagenet1k
  d = deit.get_config("gmlp_s16")
  # DeiT Table 9 / facebookresearch/deit main.py defaults (REFERENCE.md's families).
  assert (d.optimizer, d.learning_rate, d.weight_decay, d.eps, d.grad_clip_norm) == (
      "adam", 1e-3, 0.05, 1e-8, 0.0)
  assert (d.batch_size, d.num_epochs, d.lr_decay, d.end_learning_rate) == (
      1024, 300.0, "cosine", 1e-5)
  assert (d.randaugment_layers, d.randaugment_magnitude, d.model.stoch_depth) == (2, 27, 0.1)
  for variant, rate in (("gmlp_ti16", 0.0), ("gmlp_s16", 0.05), ("gmlp_b16", 0.2)):
    c = gmlp_imagenet1k.get_config(variant)
    assert c.model.stoch_depth == rate
    assert _differs(c, deit.get_config(variant)) <= {"model.stoch_depth"}
  for variant in resmlp_imagenet1k.VARIANTS:
    c = resmlp_imagenet1k.get_config(variant)
    assert c.eval_crop_fraction == 0.9 and (c.eps, c.num_epochs) == (1e-6, 400.0)
    assert c.model.stoch_depth == (0.05 if variant == "resmlp_12" else 0.1)
    assert _differs(c, deit.get_config(variant)) - {"model.stoch_depth"} == {
        "eval_crop_fraction", "optimizer", "eps", "weight_decay", "learning_rate",
        "num_epochs"}
  with pytest.raises(ValueError, match=r"^configs/deit.py needs a variant: "):
    deit.get_config()


def test_the_base_defaults_are_neutral():
  """No warmup, augmentation or regulariser unless a recipe asks for it."""
  c = common.base_config()
  assert c.warmup_steps == 0 and c.weight_decay == 0.0 and c.label_smoothing == 0.0
  assert (c.randaugment_layers, c.mixup_alpha, c.cutmix_alpha) == (0, 0.0, 0.0)
  assert (c.model.stoch_depth, c.model.dropout, c.loss, c.head_bias_init) == (
      0.0, 0.0, "softmax", 0.0)
  assert (c.init_from, c.fewshot_every_steps, c.sharding) == ("", 0, "replicate")


def test_the_demo_recipes_hold_their_documented_values():
  from configs import default, fashion_mnist
  d = default.get_config()
  assert (d.dataset, d.image_size, d.batch_size, d.num_train_steps) == (
      "mixer_digits", 8, 128, 600)
  assert (d.learning_rate, d.weight_decay, d.warmup_steps, d.lr_decay) == (
      3e-3, 1e-4, 100, "cosine")
  assert (d.train_crop, d.train_flip) == ("none", False)
  short, long = fashion_mnist.get_config(), fashion_mnist.get_config("long")
  for c in (short, long):
    assert (c.optimizer, c.learning_rate, c.weight_decay, c.label_smoothing) == (
        "adam", 2e-3, 0.05, 0.1)
    assert (c.batch_size, c.lr_decay, c.grad_clip_norm) == (128, "cosine", 1.0)
    assert (c.model.num_blocks, c.model.hidden_dim, c.model.tokens_mlp_dim,
            c.model.channels_mlp_dim) == (8, 128, 64, 256)
  assert (short.num_epochs, short.warmup_steps, short.model.stoch_depth) == (24, 500, 0.0)
  assert (long.num_epochs, long.warmup_steps, long.model.stoch_depth) == (64, 1000, 0.1)


# One call per argument each config file accepts (recorded.py needs a workdir: see
# test_run_record).
ARGS = {"default": ("mixer", "resmlp", "gmlp"), "fashion_mnist": ("", "long"),
        "finetune": ("",) + tuple(finetune.DATASETS) + ("mixer_digits", "folder:/data/x"), "deit": ("B/16", "gmlp_s16"),
        "gmlp_imagenet1k": ("gmlp_ti16", "gmlp_s16", "gmlp_b16"),
        "resmlp_imagenet1k": ("resmlp_12", "resmlp_24", "resmlp_36", "resmlp_big_24"),
        "imagenet": imagenet1k_pretrain.VARIANTS,
        "imagenet1k_pretrain": imagenet1k_pretrain.VARIANTS,
        "imagenet21k_pretrain": imagenet1k_pretrain.VARIANTS}


def test_every_config_sets_only_keys_of_the_base():
  """The trainer refuses a key the base lacks (errors.require_known_keys); no recipe may
  set one, whatever it inherits from."""
  import importlib
  known = set(_flat(common.base_config()))
  recipes = {p.stem for p in pathlib.Path(REPO, "configs").glob("*.py")} - {"__init__", "common",
                                                                  "recorded"}
  assert recipes == set(ARGS)
  for name, args in ARGS.items():
    module = importlib.import_module(f"configs.{name}")
    for arg in args:
      assert set(_flat(module.get_config(arg))) == known, (name, arg)


def test_recipe_files_are_short_with_a_short_docstring_and_a_command():
  import ast
  for path in sorted(pathlib.Path(REPO, "configs").glob("*.py")):
    if path.stem in ("__init__", "common"):
      continue
    text = path.read_text()
    assert len(text.splitlines()) <= 60, path.name
    node = ast.parse(text).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), path.name
    assert node.end_lineno - node.lineno + 1 <= 20, path.name
    assert f"--config=configs/{path.name}" in node.value.value, path.name
