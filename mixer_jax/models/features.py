"""Intermediate features for probing and dense tasks, from any family, either layout.

  out, feats = models.capture(model, params, images)               # each block's output
  out, feats = models.capture(model, params, images, mixing=True)  # and the mixings'
  feats["blocks"]          (N, B, S, C): block i's output tokens
  feats["token_mixing"]    (N, B, ...):  the token-mixing MLP's output (gMLP: the
                                         spatial gating unit's), as the block computes it
  feats["channel_mixing"]  (N, B, S, C): the channel-mixing MLP's output (Mixer, ResMLP)

It is flax's own `capture_intermediates`, filtered to the blocks' (and their mixing
modules') `__call__`: nothing is added to the model and the parameter tree is the
same. Scanned blocks stack their intermediates on the block axis as they stack their
parameters (blocks.run_blocks), so both layouts give the same arrays.
`BlockFeatures(model, k, block)` is a model whose `apply` returns block k's tokens averaged
over the tokens: the few-shot probe of a middle layer (config.fewshot_layer).
"""

import re

import jax.numpy as jnp

# The mixing modules' names in the family files.
MIXING = {"token_mixing": "token_mixing", "spatial_gating": "token_mixing",
          "channel_mixing": "channel_mixing"}


def capture(model, params, images, *, block: str, mixing: bool = False, **apply_kwargs):
  """(the model's output, {"blocks": ..., ["token_mixing": ..., "channel_mixing": ...]});
  `block`: the family's block name (models.capture passes it)."""
  block = re.compile(rf"{re.escape(block)}(_\d+)?")

  def keep(module, method):
    if method != "__call__" or module.name is None:
      return False
    if block.fullmatch(module.name):
      return True
    return mixing and module.name in MIXING

  out, state = model.apply({"params": params}, images, capture_intermediates=keep,
                           mutable=["intermediates"], **apply_kwargs)
  found = {}
  for name, node in state["intermediates"].items():
    match = block.fullmatch(name)
    if not match:
      continue
    index = int(match.group(1)[1:]) if match.group(1) else None  # None: scanned.
    entries = {"blocks": node["__call__"][0]}
    for child, kind in MIXING.items():
      if child in node:
        entries[kind] = node[child]["__call__"][0]
    for kind, value in entries.items():
      found.setdefault(kind, {})[index] = value
  stacked = {}
  for kind, by_index in found.items():
    if None in by_index:
      stacked[kind] = by_index[None]
    else:
      stacked[kind] = jnp.stack([by_index[i] for i in sorted(by_index)])
  return out, stacked


class BlockFeatures:
  """`model`'s block `layer` output averaged over the tokens, as a model: `apply`
  takes and returns what the pooled pre-logits model's does (few-shot probes)."""

  def __init__(self, model, layer: int, block: str):
    self.model, self.layer, self.block = model, layer, block

  def apply(self, variables, images, train: bool = False):
    _, feats = capture(self.model, variables["params"], images, block=self.block,
                       train=train)
    return feats["blocks"][self.layer].mean(axis=1).astype("float32")
