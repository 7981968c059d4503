"""Random access to the examples of a prepared TFDS split, by global example index.

The training order draws example i of a split at any position (input_pipeline.py),
so each split needs `examples[i]` in O(1). TFDS's own random-access sources need
datasets prepared as ArrayRecord; datasets prepared as TFRecord (TFDS's default, and
what a prepared ImageNet usually is) get an offset index here instead: one pass over
the record headers of the split's files (8 bytes read per record), then `os.pread`
of one record per lookup, safe from many threads at once. Records are deserialized
with the dataset's own feature spec, images left encoded.

TFRecord framing: uint64 length, uint32 CRC of the length, `length` bytes of data,
uint32 CRC of the data (little-endian).
"""

import os
import struct
from typing import Any, Dict, List

import numpy as np
import tensorflow_datasets as tfds

from mixer_jax import errors

_HEADER = 12  # length + its CRC.
_FOOTER = 4   # CRC of the data.


def record_offsets(path: str) -> np.ndarray:
  """(offset of the data, length) of every record of a TFRecord file, in order."""
  rows = []
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    position = 0
    while position < size:
      header = os.pread(f.fileno(), 8, position)
      if len(header) < 8:
        raise errors.DataError(f"TFRecord file {path} is truncated at byte {position}; "
                               "prepare the dataset again.")
      (length,) = struct.unpack("<Q", header)
      rows.append((position + _HEADER, length))
      position += _HEADER + length + _FOOTER
    if position != size:
      raise errors.DataError(f"TFRecord file {path} is truncated (its last record ends at "
                             f"byte {position} of {size}); prepare the dataset again.")
  return np.asarray(rows, np.int64).reshape(-1, 2)


class TfrecordExamples:
  """The examples of one (possibly sliced) TFDS split prepared as TFRecord files."""

  def __init__(self, builder, split: str, keep: Dict[str, str]):
    self._features = builder.info.features
    self._decoders = {"image": tfds.decode.SkipDecoding()}
    self._keep = keep  # Output name -> feature name.
    self._files: List[int] = []
    rows = []
    for instruction in builder.info.splits[split].file_instructions:
      offsets = record_offsets(instruction.filename)
      take = len(offsets) - instruction.skip if instruction.take < 0 else instruction.take
      chosen = offsets[instruction.skip:instruction.skip + take]
      fd = os.open(instruction.filename, os.O_RDONLY)
      self._files.append(fd)
      rows.append(np.column_stack([np.full(len(chosen), fd, np.int64), chosen]))
    self._index = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    fd, offset, length = (int(v) for v in self._index[i])
    example = self._features.deserialize_example_np(os.pread(fd, length, offset),
                                                    decoders=self._decoders)
    return {name: example[feature] for name, feature in self._keep.items()}

  def close(self):
    for fd in self._files:
      os.close(fd)
    self._files = []
