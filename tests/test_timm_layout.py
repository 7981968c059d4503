"""timm's state-dict layouts of the three families: golden-file logit parity with timm,
exact round trips both ways, and one sentence for the first mismatch of a file.

The golden files under tests/fixtures/ are tiny random timm models (16 px images,
patch 4, width 16, 2 blocks, 5 classes) with their logits on fixed images, written by
benchmarks/make_timm_fixtures.py with torch + timm 1.0.31; this suite needs neither.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mixer_jax import errors, export, models, state, timm_layout, weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ("mixer", "resmlp", "gmlp")
EXPECTED_FIELDS = {
    "mixer": dict(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8,
                  channels_mlp_dim=64),
    "resmlp": dict(patch_size=4, hidden_dim=16, num_blocks=2, channels_mlp_dim=64),
    "gmlp": dict(patch_size=4, hidden_dim=16, num_blocks=2, channels_mlp_dim=96),
}


def _fixture(family):
  path = os.path.join(FIXTURES, f"timm_{family}.safetensors")
  with np.load(os.path.join(FIXTURES, f"timm_{family}.npz")) as data:
    return path, data["images"], data["logits"], json.loads(str(data["timm"]))


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_timm_golden_files(family, kernels):
  path, images, golden, meta = _fixture(family)
  params, info = weights.load_params(path)  # Every key, shape and dtype checked.
  assert info["model"] == EXPECTED_FIELDS[family] and info["num_classes"] == 5
  assert info["image_size"] == meta["img_size"] == 16
  assert weights.family_of(params).name == family
  model = state.inference_model(info, 5, kernels_name=kernels)
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  assert logits.dtype == np.float32 and np.abs(golden).max() > 0.5
  # <= 1e-5 relative to the largest logit, and elementwise.
  assert np.abs(logits - golden).max() <= 1e-5 * np.abs(golden).max()
  np.testing.assert_allclose(logits, golden, rtol=1e-5, atol=1e-6 * np.abs(golden).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_files_round_trip_bit_for_bit(family, tmp_path):
  path = _fixture(family)[0]
  original = load_file(path)
  params, _ = weights.load_params(path)
  again = export.params_to_timm(params)
  assert sorted(again) == sorted(original)
  for name, value in original.items():
    assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name
  # Through the exporter and back: the same tensors, the family's timm name in metadata.
  npz, out = str(tmp_path / "m.npz"), str(tmp_path / "m.safetensors")
  weights.save_npz(params, npz)
  export.export(npz, "timm", out)
  for name, value in load_file(out).items():
    assert np.array_equal(value, original[name]), name
  back, _ = weights.load_params(out)
  for key, value in weights.flatten(params).items():
    assert np.array_equal(weights.flatten(back)[key], value), key


def test_timm_names_of_the_new_families():
  sizes = lambda v: {k: x for k, x in models.preset(v)[1].items() if k in models.SIZE_FIELDS}
  info = lambda v: {"model": sizes(v), "num_classes": 1000, "image_size": 224}
  for variant in ("resmlp_12", "resmlp_24", "resmlp_36", "resmlp_big_24", "gmlp_ti16",
                  "gmlp_s16", "gmlp_b16"):
    family = models.preset(variant)[0].name
    assert export.timm_model_name(sizes(variant), family) == f"{variant}_224"
    assert export.timm_constructor(info(variant), family) == (
        f"timm.create_model('{variant}_224', pretrained=False, num_classes=1000, "
        "img_size=224)")
  custom = {"model": EXPECTED_FIELDS["resmlp"], "num_classes": 5}
  assert export.timm_model_name(custom["model"], "resmlp") is None
  assert "block_layer=timm.models.mlp_mixer.ResBlock" in export.timm_constructor(
      custom, "resmlp")


def _resave(tmp_path, name, state_dict):
  path = str(tmp_path / f"{name}.safetensors")
  save_file(state_dict, path)
  return path


@pytest.mark.parametrize("family,change,fragment", [
    ("resmlp", lambda sd: sd.pop("blocks.1.ls2"),
     "is missing parameter blocks.1.ls2 (shape (16,) in the ResMLP that its stem"),
    ("resmlp", lambda sd: sd.update({"norm.alpha": sd["norm.alpha"].reshape(16)}),
     "parameter norm.alpha has shape (16,) but the ResMLP that its stem and first block "
     "describe expects (1, 1, 16)"),
    ("gmlp", lambda sd: sd.update({"blocks.0.mlp_channels.gate.proj.bias":
                                   np.zeros(16, np.int32)}),
     "parameter blocks.0.mlp_channels.gate.proj.bias has dtype int32"),
    ("gmlp", lambda sd: sd.update({"blocks.1.attn.qkv.weight": np.zeros(3, np.float32)}),
     "entry blocks.1.attn.qkv.weight is not part of timm's gMLP"),
])
def test_a_bad_timm_file_is_one_sentence_naming_file_and_entry(tmp_path, family, change,
                                                               fragment):
  state_dict = load_file(_fixture(family)[0])
  change(state_dict)
  path = _resave(tmp_path, family, state_dict)
  with pytest.raises(errors.CheckpointError) as e:
    weights.load_params(path)
  message = str(e.value)
  assert message.startswith(f"{path} ") and "\n" not in message
  assert fragment in message, message


def test_families_are_told_apart_and_a_file_of_another_family_is_refused():
  assert timm_layout.family_of_state_dict(load_file(_fixture("resmlp")[0])) == "resmlp"
  assert timm_layout.family_of_state_dict(load_file(_fixture("gmlp")[0])) == "gmlp"
  assert timm_layout.family_of_state_dict(load_file(_fixture("mixer")[0])) == "mixer"
  resmlp, _ = weights.load_params(_fixture("resmlp")[0])
  gmlp_model = models.from_preset("gmlp_s16", 5, **EXPECTED_FIELDS["gmlp"])
  with pytest.raises(errors.CheckpointError, match=re.escape(
      "r.safetensors is a ResMLP but the config asks for a gMLP; set "
      "config.model.variant to a ResMLP variant")):
    weights.load_pretrained(models.param_shapes(gmlp_model, 16), resmlp,
                               source="r.safetensors")
