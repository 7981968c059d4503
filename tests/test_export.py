"""timm / npz export: exact round trip, names and shapes, timm forward pass parity."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import export, models, weights
from mixer_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, num_blocks=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)
NUM_CLASSES = 5
IMAGE = 8  # 2x2 = 4 tokens.


def _random_params(num_classes=NUM_CLASSES, seed=0):
  model = models.from_preset("S/4", num_classes, **TINY)
  shapes = weights.flatten(models.param_shapes(model, IMAGE))
  rng = np.random.default_rng(seed)
  flat = {}
  for key, s in shapes.items():
    noise = rng.normal(size=s.shape).astype(np.float32)
    flat[key] = 1.0 + 0.3 * noise if key.endswith("scale") else 0.5 * noise
  return model, weights.unflatten(flat)


@pytest.fixture(scope="module")
def tiny():
  return _random_params()


def test_round_trip_is_exact(tiny):
  _, params = tiny
  sd = export.params_to_timm(params)
  back = export.timm_to_params(sd)
  a, b = weights.flatten(params), weights.flatten(back)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in sd.values())


def test_names_and_shapes(tiny):
  sd = export.params_to_timm(tiny[1])
  c, p, s, ds, dc = 16, 4, 4, 8, 32
  expected = {"stem.proj.weight": (c, 3, p, p), "stem.proj.bias": (c,),
              "norm.weight": (c,), "norm.bias": (c,),
              "head.weight": (NUM_CLASSES, c), "head.bias": (NUM_CLASSES,)}
  for i in range(2):
    b = f"blocks.{i}"
    expected.update({
        f"{b}.norm1.weight": (c,), f"{b}.norm1.bias": (c,),
        f"{b}.mlp_tokens.fc1.weight": (ds, s), f"{b}.mlp_tokens.fc1.bias": (ds,),
        f"{b}.mlp_tokens.fc2.weight": (s, ds), f"{b}.mlp_tokens.fc2.bias": (s,),
        f"{b}.norm2.weight": (c,), f"{b}.norm2.bias": (c,),
        f"{b}.mlp_channels.fc1.weight": (dc, c), f"{b}.mlp_channels.fc1.bias": (dc,),
        f"{b}.mlp_channels.fc2.weight": (c, dc), f"{b}.mlp_channels.fc2.bias": (c,)})
  assert {k: v.shape for k, v in sd.items()} == expected
  # Features model: no head entries.
  _, no_head = _random_params(num_classes=0)
  assert not any(k.startswith("head.") for k in export.params_to_timm(no_head))
  with pytest.raises(errors.CheckpointError, match="blocks.0.bogus.weight"):
    export.timm_to_params({**sd, "blocks.0.bogus.weight": np.zeros(1)})


def test_timm_names():
  for variant, name in [("S/32", "mixer_s32_224"), ("S/16", "mixer_s16_224"),
                        ("B/32", "mixer_b32_224"), ("B/16", "mixer_b16_224"),
                        ("L/32", "mixer_l32_224"), ("L/16", "mixer_l16_224"), ("H/14", None)]:
    fields = models.parse_variant(variant)
    assert export.timm_model_name(fields) == name, variant


# --- An independent NumPy implementation of timm's MlpMixer forward pass. ---------

def _layer_norm(x, w, b, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _linear(x, sd, name):
  return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _mlp(x, sd, name):
  return _linear(_gelu_tanh(_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def timm_forward_numpy(sd, images_nchw):
  """timm MlpMixer.forward with act_layer=GELU(tanh), in float64 NumPy."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  w = sd["stem.proj.weight"]  # OIHW.
  c, _, p, _ = w.shape
  n, ch, h, wd = images_nchw.shape
  patches = images_nchw.reshape(n, ch, h // p, p, wd // p, p).transpose(0, 2, 4, 1, 3, 5)
  x = patches.reshape(n, (h // p) * (wd // p), ch * p * p) @ w.reshape(c, -1).T
  x = x + sd["stem.proj.bias"]  # (N, tokens, C), tokens row-major (flatten(2).transpose).
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    b = f"blocks.{i}"
    y = _layer_norm(x, sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"]).transpose(0, 2, 1)
    x = x + _mlp(y, sd, f"{b}.mlp_tokens").transpose(0, 2, 1)
    y = _layer_norm(x, sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"])
    x = x + _mlp(y, sd, f"{b}.mlp_channels")
    i += 1
  x = _layer_norm(x, sd["norm.weight"], sd["norm.bias"]).mean(1)
  return _linear(x, sd, "head") if "head.weight" in sd else x


def test_numpy_timm_forward_matches_flax(tiny):
  model, params = tiny
  images = np.random.default_rng(1).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)
  flax_logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(
      params, jnp.asarray(images)))
  timm_logits = timm_forward_numpy(export.params_to_timm(params), images.transpose(0, 3, 1, 2))
  assert np.abs(flax_logits).max() > 0.1
  np.testing.assert_allclose(flax_logits, timm_logits, atol=1e-5, rtol=1e-5)


def _run_cli(*args):
  return subprocess.run([sys.executable, "-m", "mixer_jax.export", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_both_formats_and_errors(tiny, tmp_path):
  from safetensors.numpy import load_file, safe_open
  ckpt = str(tmp_path / "tiny.npz")
  weights.save_npz(tiny[1], ckpt)

  out = str(tmp_path / "out" / "tiny.safetensors")
  r = _run_cli(f"--checkpoint={ckpt}", "--format=timm", f"--output={out}")
  assert r.returncode == 0, r.stderr
  sd = load_file(out)
  expected = export.params_to_timm(tiny[1])
  assert sorted(sd) == sorted(expected)
  for k in sd:
    np.testing.assert_array_equal(sd[k], expected[k])
  with safe_open(out, "np") as f:
    assert f.metadata()["gelu"] == "tanh"
  assert "approximate='tanh'" in r.stdout
  assert "No timm model name matches" in r.stderr  # Tiny model: no timm name.

  out_npz = str(tmp_path / "copy.npz")
  export.export(ckpt, "npz", out_npz)  # In-process (same code path as the CLI).
  a, b = weights.flatten(weights.load_npz(ckpt)), weights.flatten(
      weights.load_npz(out_npz))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

  r = _run_cli(f"--checkpoint={ckpt}", "--format=onnx", f"--output={out}")
  assert r.returncode == 2 and "Unknown format 'onnx'" in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1

  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(errors.CheckpointError, match="Cannot write output"):
    export.export(ckpt, "npz", str(blocker / "sub" / "x.npz"))  # Parent is a file.


def test_cli_unwritable_output_exit_code(tiny, tmp_path):
  ckpt = str(tmp_path / "tiny.npz")
  weights.save_npz(tiny[1], ckpt)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = _run_cli(f"--checkpoint={ckpt}", "--format=npz", f"--output={blocker}/x.npz")
  assert r.returncode == 2 and "Cannot write output" in r.stderr, r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_torch_timm_parity(tiny):
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  model, params = tiny
  tm = timm.models.mlp_mixer.MlpMixer(
      num_classes=NUM_CLASSES, img_size=IMAGE, patch_size=4, num_blocks=2, embed_dim=16,
      mlp_ratio=(0.5, 2.0), act_layer=functools.partial(torch.nn.GELU, approximate="tanh"))
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in export.params_to_timm(params).items()},
                     strict=True)
  tm.eval()
  images = np.random.default_rng(2).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(images)))
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_output_checks_before_writing(tiny, tmp_path, monkeypatch):
  ckpt = str(tmp_path / "tiny.npz")
  weights.save_npz(tiny[1], ckpt)
  for fmt, output, fragment in [
      ("timm", "x.npz", "has the extension of --format=npz, not of --format=timm; name it "
                        "*.safetensors or pass --format=npz."),
      ("npz", "x.safetensors", "has the extension of --format=timm, not of --format=npz"),
      ("npz", "tiny.npz", "already exists; pass --overwrite to replace it")]:
    with pytest.raises(errors.CheckpointError, match=re.escape(fragment)):
      export.export(ckpt, fmt, str(tmp_path / output))
  export.export(ckpt, "npz", ckpt, overwrite=True)  # Asked: replaced, still complete.
  assert weights.load_npz(ckpt).keys() == tiny[1].keys()

  import safetensors.numpy
  def half_written(tensors, path, metadata=None):
    open(path, "wb").write(b"partial")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
  with pytest.raises(errors.CheckpointError, match="Cannot write output .*No space left"):
    export.export(ckpt, "timm", str(tmp_path / "full.safetensors"))
  assert sorted(os.listdir(tmp_path)) == ["tiny.npz"]  # No partial or temp file.


def test_exported_safetensors_exports_again(tiny, tmp_path):
  """Our own timm file is a valid --checkpoint: back to .npz, bit for bit."""
  ckpt, st, back = (str(tmp_path / n) for n in ("a.npz", "a.safetensors", "b.npz"))
  weights.save_npz(tiny[1], ckpt)
  export.export(ckpt, "timm", st)
  export.export(st, "npz", back)
  a, b = weights.flatten(tiny[1]), weights.flatten(weights.load_npz(back))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_both_formats_get_a_normal_files_mode(tiny, tmp_path):
  # safetensors creates its file 0600; an export is a normal file: 0666 less the umask.
  ckpt = str(tmp_path / "tiny.npz")
  weights.save_npz(tiny[1], ckpt)
  previous = os.umask(0o022)
  try:
    for fmt, name in (("timm", "x.safetensors"), ("npz", "x.npz")):
      export.export(ckpt, fmt, str(tmp_path / name))
      assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, fmt
  finally:
    os.umask(previous)
