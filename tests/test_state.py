"""state.py, the one setup path: Setup on the tiny config builds the abstract state
with its shardings, a fresh state of those shapes, a jitted train step and eval step;
parameters placed from numpy; and validate_config's one sentence per bad value."""

import re

import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from mixer_jax import errors
from mixer_jax import models
from mixer_jax import sharding
from mixer_jax import state as state_lib

NUM_CLASSES = 10
BATCH = 8


def _config(**overrides):
  # Setup reads no data; one block is enough here.
  return tiny_config("/nonexistent/tfds", **{"model.num_blocks": 1, **overrides})


def _batch(setup, n=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  local = {"image": rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32),
           "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
           "mask": (np.arange(n) < n - 3).astype(np.float32)}  # The last 3 are padding.
  return local, sharding.global_batch(local, setup.mesh)


@pytest.fixture(scope="module")
def setup():
  return state_lib.Setup(_config(), NUM_CLASSES, total_steps=4)


@pytest.fixture(scope="module")
def fresh(setup):
  return setup.init_state()


def _same_layout(tree, abstract):
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(abstract)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_abstract_state_has_shapes_and_shardings(setup):
  abstract = setup.abstract_state
  assert set(abstract) == {"step", "params", "opt_state"}
  assert abstract["params"]["head"]["kernel"].shape == (16, NUM_CLASSES)
  for leaf, s in zip(jax.tree_util.tree_leaves(abstract),
                     jax.tree_util.tree_leaves(setup.state_sharding)):
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding == s
  assert setup.num_params == models.count_params(
      models.param_shapes(setup.eval_model, 8))
  # Training model: the config's rates; evaluation model: none.
  assert (setup.eval_model.stoch_depth, setup.eval_model.dropout) == (0.0, 0.0)


def test_scan_and_remat_policy_reach_the_models_and_their_shardings():
  config = _config(**{"model.scan": True, "model.remat_policy": "full", "model.num_blocks": 2})
  other = state_lib.Setup(config, NUM_CLASSES, mesh=sharding.make_mesh(1, jax.devices()[:1]))
  for model in (other.model, other.eval_model, other.feature_model()):
    assert (model.scan, model.remat_policy) == (True, "full")
  kernel = other.abstract_state["params"]["MixerBlock"]["channel_mixing"]["Dense_0"]["kernel"]
  assert kernel.shape == (2, 16, 32)
  # Parameters in the released (unrolled) layout are placed in the model's.
  unrolled = models.to_unrolled(other.abstract_state["params"])
  rng = np.random.default_rng(0)
  unrolled = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                    unrolled)
  placed = other.place_params(unrolled)
  _same_layout(placed, other.abstract_state["params"])
  np.testing.assert_array_equal(
      placed["MixerBlock"]["channel_mixing"]["Dense_0"]["kernel"][1],
      unrolled["MixerBlock_1"]["channel_mixing"]["Dense_0"]["kernel"])
  assert other.num_params == models.count_params(
      models.param_shapes(state_lib.build_model(_config(**{"model.num_blocks": 2}),
                                                NUM_CLASSES), 8))


def test_fields_given_to_setup_win_over_the_config():
  fields = dict(patch_size=4, num_blocks=1, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=8)
  other = state_lib.Setup(_config(), 3, fields=fields)
  assert other.fields == fields and other.model.hidden_dim == 8
  assert other.abstract_state["params"]["head"]["kernel"].shape == (8, 3)


def test_init_state_matches_the_abstract_state(setup, fresh):
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(
      setup.abstract_state)
  _same_layout(fresh, setup.abstract_state)
  assert int(fresh["step"]) == 0


def _compiled(jitted, *args):
  """The jitted step compiled for these arguments with XLA's CPU backend optimisations
  off: the same program (shardings, donation), in about half the compile time."""
  return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def test_train_step_runs_one_step(setup, fresh):
  state = jax.tree_util.tree_map(lambda x: x.copy(), fresh)  # The step donates its input.
  before = jax.device_get(fresh["params"])
  batch = _batch(setup)[1]
  step = _compiled(setup.train_step(), state, batch)
  for expected_step in (1, 2):
    state, metrics = step(state, batch)
    assert int(state["step"]) == expected_step
    _same_layout(state, setup.abstract_state)
    assert set(metrics) == {"loss", "accuracy", "grad_norm", "finite"}
    assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["finite"]) == 1
    moved = jax.tree_util.tree_map(lambda a, b: np.any(np.asarray(a) != b),
                                   jax.device_get(state["params"]), before)
    # Step 0 is the warmup's first, at learning rate 0; step 1 moves the parameters.
    assert any(jax.tree_util.tree_leaves(moved)) == (expected_step == 2)


def test_eval_step_sums_over_the_real_examples(setup, fresh):
  local, batch = _batch(setup)
  sums = jax.device_get(_compiled(setup.eval_step(), fresh["params"], batch)(
      fresh["params"], batch))
  assert set(sums) == {"loss", "accuracy", "num_examples", "top5"}
  real = local["mask"] == 1
  assert sums["num_examples"] == real.sum() == BATCH - 3
  logits = np.asarray(setup.eval_model.apply({"params": fresh["params"]}, local["image"]))
  losses = optax.softmax_cross_entropy(logits, np.eye(NUM_CLASSES)[local["label"]])
  np.testing.assert_allclose(sums["loss"], np.sum(np.asarray(losses)[real]), rtol=1e-5)
  hits = np.argmax(logits, -1) == local["label"]
  assert sums["accuracy"] == hits[real].sum()
  assert sums["accuracy"] <= sums["top5"] <= sums["num_examples"]


def test_place_params_round_trips_numpy_params(setup, fresh):
  host = jax.device_get(fresh["params"])
  placed = setup.place_params(host)
  _same_layout(placed, setup.abstract_state["params"])
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(placed)),
                  jax.tree_util.tree_leaves(host)):
    np.testing.assert_array_equal(a, b)


def test_state_with_params_keeps_them_at_step_zero(setup):
  rng = np.random.default_rng(1)
  given = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                 setup.abstract_state["params"])
  state = setup.state_with_params(given)
  assert int(state["step"]) == 0
  _same_layout(state, setup.abstract_state)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state["params"])),
                  jax.tree_util.tree_leaves(given)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- validate_config
@pytest.mark.parametrize("overrides,sentence", [
    (dict(batch_size=0), "config.batch_size=0 must be a positive number."),
    (dict(batch_size=True), "config.batch_size=True must be a positive number."),
    (dict(learning_rate=-1.0), "config.learning_rate=-1.0 must be zero or positive."),
    (dict(num_train_steps=0, num_epochs=0.0),
     "config.num_epochs=0.0 must be a positive number (or set num_train_steps)."),
    (dict(label_smoothing=1.0), "config.label_smoothing=1.0 must be in [0, 1)."),
    (dict(randaugment_magnitude=31),
     "config.randaugment_magnitude=31 must be in [0, 30] (paper: 15)."),
    ({"model.hidden_dim": -4},
     "config.model.hidden_dim=-4 must be a positive integer (or unset for the preset's value)."),
    (dict(loss="hinge"), "config.loss='hinge' is not one of softmax, sigmoid."),
    (dict(optimizer="lars"), "config.optimizer='lars' is not one of adam, sgd, lamb."),
    ({"model.remat_policy": "dots"}, "config.model.remat_policy='dots' is not one of none, "
     "full, dots_saveable, dots_with_no_batch_dims_saveable."),
])
def test_validate_config_refuses_bad_values_in_one_sentence(overrides, sentence):
  with pytest.raises(errors.ConfigError, match=f"^{re.escape(sentence)}$"):
    state_lib.validate_config(_config(**overrides))


def test_validate_config_accepts_the_tiny_config_and_names_an_unknown_variant():
  state_lib.validate_config(_config())
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.variant: .*'Z/9'"):
    state_lib.resolve_model(_config(**{"model.variant": "Z/9"}))


# -------------------------------------------------------- every family, one path
def test_resmlp_and_gmlp_build_through_the_same_setup():
  """config.model.variant names the family; a scanned gMLP stacks under GMlpBlock."""
  for variant, scan, block in (("resmlp_12", False, "ResMlpBlock_0"),
                               ("gmlp_s16", True, "GMlpBlock")):
    config = _config(**{"model.variant": variant, "model.tokens_mlp_dim": None,
                        "model.scan": scan, "model.stoch_depth": 0.1})
    assert state_lib.size_fields(config) == dict(patch_size=2, num_blocks=1, hidden_dim=16,
                                                 channels_mlp_dim=32)
    setup = state_lib.Setup(config, NUM_CLASSES, total_steps=4)  # Nothing compiled.
    params = setup.abstract_state["params"]
    assert block in params and setup.model.stoch_depth == 0.1
    assert setup.eval_model.stoch_depth == 0.0 and setup.model.scan == scan
    # Adam's moments follow the parameters' layout, sharded by the same rules.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        setup.abstract_state["opt_state"][1].mu)
  with pytest.raises(errors.ConfigError, match=re.escape(
      "config.model.tokens_mlp_dim=16 is not a field of resmlp_12 (a resmlp model: "
      "patch_size, num_blocks, hidden_dim, channels_mlp_dim, layerscale_init, "
      "approximate_gelu, stoch_depth, dropout, remat_policy, scan); leave it unset.")):
    state_lib.resolve_model(_config(**{"model.variant": "resmlp_12"}))


def test_finetuning_from_a_released_b16_file_is_named_b16():
  """configs/finetune.py (variant "") from a B/16-size file: the sizes, and the name B/16
  (as checkpoint.load_params describes a released file)."""
  from configs import finetune
  sizes = {k: v for k, v in models.preset("B/16")[1].items()}
  info = {"model": sizes, "num_classes": 21843, "image_size": 224, "family": "mixer",
          "variant": models.model_name("mixer", sizes)}
  assert info["variant"] == "B/16"
  config = finetune.get_config()
  config.image_size = 0
  state_lib.resolve_model(config, info, "Mixer-B_16.npz")
  assert (config.model.name, config.model.family, config.image_size) == ("B/16", "mixer", 224)
  assert state_lib.size_fields(config) == sizes
  # The preset named instead: the same; another size is refused in one sentence.
  config = finetune.get_config()
  config.model.variant = "B/16"
  state_lib.resolve_model(config, info, "Mixer-B_16.npz")
  assert config.model.name == "B/16"
  config = finetune.get_config()
  config.model.variant = "S/16"
  with pytest.raises(errors.CheckpointError, match=re.escape(
      "config.model gives hidden_dim=512 (variant S/16) but init_from Mixer-B_16.npz was "
      "trained with hidden_dim=768 (variant B/16)")):
    state_lib.resolve_model(config, info, "Mixer-B_16.npz")
