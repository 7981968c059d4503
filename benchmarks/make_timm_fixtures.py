r"""Writes the golden files of timm parity: tiny random timm models of each family.

  env -u PYTHONPATH /opt/timmvenv/bin/python benchmarks/make_timm_fixtures.py

For each family (timm 1.0.31, timm/models/mlp_mixer.py: MlpMixer with MixerBlock,
ResBlock + Affine, or SpatialGatingBlock + GatedMlp) it builds a tiny model (16 px
images, patch 4 -> 16 tokens, width 16, 2 blocks, 5 classes), sets every parameter
to seeded random values (so Affine, LayerScale and the spatial gate are far from
their initial values), and writes under tests/fixtures/:

  timm_<family>.safetensors   the model's state dict (float32), as timm saves it
  timm_<family>.npz           images (NHWC float32 in [-1, 1]), logits (float64: the
                              float32 weights run in float64 by timm, the exact answer),
                              and `timm` (the constructor, a string)

tests/test_timm_parity.py reads them without torch. The Mixer runs with the tanh GELU
(the released Mixers' and this codebase's); ResMLP and gMLP with timm's exact GELU.
Needs torch and timm, which are not project requirements; run with the project's
PYTHONPATH unset.
"""

import functools
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from timm.layers import GatedMlp
from timm.models import mlp_mixer

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                   "fixtures")
COMMON = dict(num_classes=5, img_size=16, patch_size=4, num_blocks=2, embed_dim=16)
FAMILIES = {
    "mixer": dict(mlp_ratio=(0.5, 4.0),
                  act_layer=functools.partial(torch.nn.GELU, approximate="tanh")),
    "resmlp": dict(mlp_ratio=4, block_layer=functools.partial(mlp_mixer.ResBlock,
                                                              init_values=1e-4),
                   norm_layer=mlp_mixer.Affine),
    "gmlp": dict(mlp_ratio=6, block_layer=mlp_mixer.SpatialGatingBlock, mlp_layer=GatedMlp),
}
CONSTRUCTORS = {
    "mixer": "MlpMixer(mlp_ratio=(0.5, 4.0), act_layer=GELU(approximate='tanh'))",
    "resmlp": "MlpMixer(mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)",
    "gmlp": "MlpMixer(mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)",
}


def randomize(model, seed: int):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("alpha", "ls1", "ls2") or (leaf == "weight" and p.ndim == 1):
        p.copy_(1.0 + 0.3 * noise)  # Scales (Affine alpha, LayerScale, LayerNorm weight).
      else:
        p.copy_(0.3 * noise)


def main():
  os.makedirs(OUT, exist_ok=True)
  for i, (family, kwargs) in enumerate(FAMILIES.items()):
    model = mlp_mixer.MlpMixer(**COMMON, **kwargs).eval()
    randomize(model, seed=i)
    images = np.random.default_rng(100 + i).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
      logits = model.double()(torch.from_numpy(images).double().permute(0, 3, 1, 2)).numpy()
    model.float()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, f"timm_{family}.safetensors"))
    np.savez(os.path.join(OUT, f"timm_{family}.npz"), images=images, logits=logits,
             timm=json.dumps(dict(COMMON, constructor=CONSTRUCTORS[family],
                                  timm=__import__("timm").__version__)))
    print(family, sum(p.numel() for p in model.parameters()), "parameters, logits",
          np.round(logits[0], 4))


if __name__ == "__main__":
  main()
