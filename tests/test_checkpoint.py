"""checkpoint.py: orbax training checkpoints in the run's own block layout (scanned or
unrolled), restored into either; and weights.init_state, init_from into a train state."""

import logging
import os

import jax
import numpy as np
import pytest

from mixer_jax import checkpoint
from mixer_jax import run_record
from mixer_jax import models
from mixer_jax import weights
from test_models import _random_params as random_params


# --- Training checkpoints: the run's own layout on disk; either restores into either.

@pytest.fixture(scope="module")
def setups():
  """Setups of the tiny digits model, unrolled (False) and scanned (True)."""
  from conftest import tiny_config
  from mixer_jax import state
  return {scan: state.Setup(tiny_config("/nonexistent/tfds", **{"model.scan": scan}), 10,
                            total_steps=4) for scan in (False, True)}


@pytest.fixture(scope="module")
def scanned_state(setups):
  """A scanned train state (params and Adam's moments) of random values (nothing
  compiled), placed, and its host copy in the unrolled layout."""
  from mixer_jax import state
  rng = np.random.default_rng(8)
  host = jax.tree_util.tree_map(
      lambda a: (rng.normal(size=a.shape).astype(a.dtype)
                 if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, 2, a.dtype)),
      setups[True].abstract_state)
  return state.place(host, setups[True].state_sharding), models.to_unrolled(host)


def stored_items(workdir, step=2):
  """{item: {key: shape}} of a step's params and opt_state, as orbax stored them."""
  ckpts = checkpoint.TrainCheckpoints(workdir, 3)
  try:
    found = ckpts.manager.item_metadata(step)
    return {item: {jax.tree_util.keystr(k): tuple(m.shape) for k, m in
                   jax.tree_util.tree_leaves_with_path(found[item].tree)}
            for item in ("params", "opt_state")}
  finally:
    ckpts.close()


def _restore(workdir, setup):
  ckpts = checkpoint.TrainCheckpoints(workdir, 3, setup.shardings)
  try:
    return ckpts.restore_latest(setup.abstract_state)
  finally:
    ckpts.close()


def _assert_state(restored, expected, setup):
  """Bit-identical values, the setup's shardings."""
  assert int(restored["step"]) == 2
  got = {k: restored[k] for k in ("params", "opt_state")}
  want = {k: expected[k] for k in ("params", "opt_state")}
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got),
                             jax.tree_util.tree_leaves(want),
                             jax.tree_util.tree_leaves({k: setup.state_sharding[k]
                                                        for k in got})):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert a.sharding.is_equivalent_to(s, a.ndim), jax.tree_util.keystr(path)


def test_scanned_and_unrolled_runs_keep_their_layout_and_restore_either(
    tmp_path, setups, scanned_state):
  from mixer_jax import export, state
  scanned, unrolled = scanned_state
  work = {scan: str(tmp_path / f"scan_{scan}") for scan in (False, True)}
  states = {True: scanned, False: state.place(unrolled, setups[False].state_sharding)}
  for scan, workdir in work.items():
    ckpts = checkpoint.TrainCheckpoints(workdir, 3, setups[scan].shardings)
    ckpts.save(2, states[scan])
    ckpts.close()
  # Each run's files hold its own layout: a save converts nothing.
  assert "['MixerBlock']['token_mixing']['Dense_0']['kernel']" in stored_items(work[True])["params"]
  assert "['MixerBlock_1']['token_mixing']['Dense_0']['kernel']" in \
      stored_items(work[False])["params"]
  for scan in (False, True):  # Each run's files restore into either model.
    for written in (False, True):
      _assert_state(_restore(work[written], setups[scan]),
                    models.to_layout(unrolled, models.model_layout(setups[scan].model)),
                    setups[scan])
  # The readers of a workdir get the released layout: load_params and export.
  run_record.write_model_file(work[True], dict(model=setups[True].fields, num_classes=10,
                                               image_size=8))
  out, saved, stacked = (str(tmp_path / f"{n}.npz") for n in ("out", "saved", "stacked"))
  export.export(work[True], "npz", out)
  # save_npz of scanned parameters writes the released layout; a file of stacked
  # blocks (np.savez of a scanned model) loads in it.
  weights.save_npz(models.to_scanned(unrolled["params"]), saved)
  np.savez(stacked, **weights.flatten(models.to_scanned(unrolled["params"])))
  for params in (weights.load_params(work[True])[0], weights.load_npz(out),
                 weights.load_npz(saved), weights.load_params(stacked)[0]):
    a, b = weights.flatten(params), weights.flatten(unrolled["params"])
    assert sorted(a) == sorted(b)
    for k in a:
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_scanned_files_written_by_orbax_itself_restore_into_either_model(
    tmp_path, setups, scanned_state):
  import orbax.checkpoint as ocp
  scanned, unrolled = scanned_state
  workdir = str(tmp_path / "w")
  with ocp.CheckpointManager(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)) as mngr:
    mngr.save(2, args=ocp.args.Composite(
        params=ocp.args.StandardSave(scanned["params"]),
        opt_state=ocp.args.StandardSave(scanned["opt_state"]),
        meta=ocp.args.JsonSave({"step": 2})))
  assert "['MixerBlock']['token_mixing']['Dense_0']['kernel']" in stored_items(workdir)["params"]
  _assert_state(_restore(workdir, setups[False]), unrolled, setups[False])
  _assert_state(_restore(workdir, setups[True]), models.to_scanned(unrolled), setups[True])
  run_record.write_model_file(workdir, dict(model=setups[True].fields, num_classes=10,
                                            image_size=8))
  params = weights.flatten(weights.load_params(workdir)[0])
  assert params.keys() == weights.flatten(unrolled["params"]).keys()


def test_init_from_a_released_npz_into_a_scanned_model(tmp_path, setups, scanned_state,
                                                        caplog):
  """The merge itself (load_pretrained into fresh scanned parameters on the host), and
  train.py's one call for it (weights.init_state): a 5-class file into the 10-class
  model re-initialises the head, logged once, to the initialiser's values."""
  setup = setups[True]
  path = str(tmp_path / "m.npz")
  weights.save_npz(random_params(models.from_preset("S/2", 5, **setup.fields), 8,
                                 seed=9), path)
  pretrained, _ = weights.load_params(path)
  fresh = models.to_scanned(scanned_state[1]["params"])
  merged = weights.load_pretrained(fresh, pretrained, source=path)
  assert models.layout(merged) == models.SCANNED
  pre = weights.flatten(pretrained)
  with caplog.at_level(logging.INFO):
    state = weights.init_state(setup, pretrained, path)
  assert sum("Re-initialising the head" in r.getMessage() for r in caplog.records) == 1
  initial = weights.flatten(models.to_unrolled(jax.device_get(setup.init_state()["params"])))
  for got, want_head in ((setup.state_with_params(merged), weights.flatten(
      models.to_unrolled(fresh))), (state, initial)):
    params = weights.flatten(models.to_unrolled(jax.device_get(got["params"])))
    assert sorted(params) == sorted(pre)
    for k in pre:
      want = want_head[k] if k.startswith("head/") else pre[k]
      np.testing.assert_array_equal(params[k], want, err_msg=k)


def test_reading_a_steps_params_warns_about_nothing(tmp_path, setups, caplog):
  # Evaluate, predict and export read one item of a step: no orbax warning about the
  # step's metadata file, which sits one level up.
  setup = setups[False]
  train_state = setup.init_state()
  ckpts = checkpoint.TrainCheckpoints(str(tmp_path), 3, setup.shardings)
  ckpts.save(2, train_state)
  ckpts.close()
  caplog.set_level(logging.INFO)
  params = checkpoint.read_params(str(tmp_path))
  np.testing.assert_array_equal(params["stem"]["kernel"], train_state["params"]["stem"]["kernel"])
  assert "Metadata file does not exist" not in caplog.text
