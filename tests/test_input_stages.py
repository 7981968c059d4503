"""benchmarks/input_stages.py: every stage runs and the table's rows are reported."""

import json
import sys

import tensorflow as tf

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/benchmarks")
import input_stages  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_each_stage_gives_the_image_the_pipeline_ships():
  jpeg = tf.io.encode_jpeg(tf.zeros([40, 60, 3], tf.uint8) + 128)
  seed = tf.constant([1, 2], tf.int64)
  shapes = {name: fn(jpeg, seed) for name, fn in input_stages._stages(16).items()}
  assert shapes["decode"].shape == (40, 60, 3)
  for name in ("+ resize", "+ resize, no AA", "+ flip + RA 2/15"):
    assert shapes[name].shape == (16, 16, 3) and shapes[name].dtype == tf.uint8, name
  assert shapes["+ float32"].dtype == tf.float32


def test_prints_one_rate_per_stage(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["input_stages", "--num_source_images=2", "--images=32",
                                    "--rounds=1", "--image_size=16"])
  input_stages.main()
  out = capsys.readouterr().out
  rates = json.loads(out.strip().splitlines()[-1])["images_per_s_one_thread"]
  assert list(rates) == list(input_stages._stages(16))
  assert all(r > 0 for r in rates.values())
  assert "vs former path" in out
