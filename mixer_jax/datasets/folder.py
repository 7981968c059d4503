"""Class-per-subfolder image source (``config.dataset = "folder:/path"``).

Layouts
-------
1. Split subfolders: ``root/<split>/<class>/<image>`` where ``<split>`` is any
   of ``train``, ``validation`` (alias ``val``) and ``test`` (matched
   case-insensitively). Every split folder must hold class subfolders. Other,
   non-split subfolders of ``root`` are ignored (with a warning); having both
   ``val`` and ``validation`` is an error.
2. Otherwise ``root/<class>/<image>``: ``root`` itself holds the class
   subfolders and is the single split ``train``. Hold out data by slicing,
   e.g. ``train[:90%]`` / ``train[90%:]``.

Class names are the sorted subfolder names (the union over all splits, so a
label means the same class in every split); label = index in ``class_names``.
Images may sit in nested folders below a class folder (searched recursively).
Symbolic links: each real file counts once, under the class folder it is reached
from. A link out of the dataset is followed; a link to a folder above it (a loop),
to another part of the dataset, or one real image reached from two class folders is
refused with a sentence naming the link.
Hidden files and folders (name starting with ``.``) are ignored, as are files
without an accepted extension: ``.jpg .jpeg .png .bmp .gif``
(case-insensitive), and files outside the class folders; every file left out
is counted by reason (``skipped_counts``) and logged as one line.

Order and slicing
-----------------
Each split's order is fixed: per class, file paths are sorted and then
permuted with a seed derived from (split, class name) only; the classes are
then interleaved by relative position (the j-th of a class's k files gets key
(j + 0.5) / k, ties broken by label), so any prefix or suffix holds every
class in proportion. Split names accept TFDS-style slices: ``train[:90%]``,
``train[90%:]``, ``train[:100]``, ``train[-50:]`` (percent boundaries are
``round(pct * n / 100)`` like TFDS, so ``[:p%]`` and ``[p%:]`` are disjoint and
cover the split).

Validation
----------
Each file is checked once, at construction: read, ``PIL.Image.verify()``, the
format must be one ``tf.io.decode_image`` reads (JPEG, PNG, BMP, GIF, WebP
content), then the image is loaded (JPEGs at 1/8 scale via ``draft``, which is
cheap but still reads the whole entropy-coded stream, so truncated JPEGs are
caught). A bad file raises ``ValueError`` naming it, unless
``skip_corrupt=True`` (``config.skip_corrupt_images``): then it is left out and
listed in ``skipped``. Checking ImageNet-size folders takes a while, so pass
``cache_dir`` to keep the result as JSON keyed by the absolute root path; the
cache is reused while the file list and the mtimes of all scanned folders are
unchanged (adding, removing or renaming files changes them; rewriting a file in
place does not -- delete the cache file then).

Colour
------
Grayscale, palette, 16-bit and RGBA files are accepted as they are; nothing
is recorded about them. Decode with ``decode_rgb`` (``tf.io.decode_image(...,
channels=3, expand_animations=False)``), which turns grayscale/palette into
RGB, drops alpha and keeps the first frame of animated GIFs, giving uint8
[H, W, 3] for every file.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from mixer_jax.datasets import decode
from mixer_jax.datasets.decode import decode_rgb  # pylint: disable=unused-import

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
SPLIT_ALIASES = {
    'train': 'train',
    'validation': 'validation',
    'val': 'validation',
    'test': 'test',
}
_DECODABLE_FORMATS = frozenset({'JPEG', 'MPO', 'PNG', 'BMP', 'GIF', 'WEBP'})
_CACHE_VERSION = 1
# Why a file under the root is not an example (FolderSource.skipped_counts).
SKIP_REASONS = ('outside a class folder', 'hidden', 'not an image extension',
                'linked twice', 'empty', 'unreadable', 'undecodable')
_EMPTY = 'the file is empty'
_FIX = ('remove it or set config.skip_corrupt_images=True to skip such files')
_SLICE_RE = re.compile(
    r'^\s*(?P<name>[A-Za-z_]+)\s*'
    r'(?:\[\s*(?P<start>-?\d+%?)?\s*:\s*(?P<stop>-?\d+%?)?\s*\])?\s*$')


def _is_hidden(name: str) -> bool:
  return name.startswith('.')


def _subdirs(path: str) -> List[str]:
  with os.scandir(path) as it:
    return sorted(e.name for e in it
                  if not _is_hidden(e.name) and e.is_dir(follow_symlinks=True))


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _follow_dir(link: str, cls_dir: str, root: str) -> bool:
  """Whether the walk enters the folder `link` (a symbolic link or not).

  Each real folder is visited once and keeps the label of the class folder it is
  reached from: a link back to a folder above it (a loop) and a link to another
  part of the dataset (which would give its images a second label) are refused.
  A link out of the dataset is followed (once: see `_claim`).
  """
  if not os.path.islink(link):
    return True
  real = os.path.realpath(link)
  if _inside(os.path.realpath(os.path.dirname(link)), real):
    raise ValueError(
        f'Dataset folder {root}: {link} is a symbolic link to {real}, which contains '
        'it (a loop that would list the same images again and again); remove the link.')
  real_root, real_cls = os.path.realpath(root), os.path.realpath(cls_dir)
  if _inside(real, real_root) and not _inside(real, real_cls):
    raise ValueError(
        f'Dataset folder {root}: {link} is a symbolic link to {real}, another part of '
        'the same dataset, so its images would count under two labels; remove the '
        'link or copy the images.')
  return True


def _claim(real_files: Dict[str, str], path: str, cls_dir: str) -> bool:
  """Records the real file behind `path` for its class folder; False if that class
  already has it (two links to one file: it counts once). The same real file under
  two class folders is refused: it would have two labels."""
  real = os.path.realpath(path)
  owner = real_files.get(real)
  if owner is None:
    real_files[real] = cls_dir
    return True
  if owner != cls_dir:
    raise ValueError(
        f'Image {real} is reached from two class folders, {owner} and {cls_dir} '
        '(through symbolic links), so it has no single label; keep it in one.')
  return False


def _clean_reason(exc: BaseException, path: str) -> str:
  msg = str(exc) or type(exc).__name__
  for p in (repr(path), path, repr(os.path.basename(path))):
    msg = msg.replace(p, '').strip()
  msg = ' '.join(msg.replace(';', ',').split()).rstrip('.: ')
  return msg or type(exc).__name__


def check_image(path: str) -> Optional[Tuple[str, str]]:
  """Returns None if ``path`` decodes, else (verb, reason) for the message."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return 'cannot be read', (e.strerror or _clean_reason(e, path))
  if not data:
    return 'cannot be decoded', _EMPTY
  large = decode.too_large(decode.pixel_size(data))
  if large:  # Refused before decoding, as decode.load_rgb does.
    return 'is too large', large
  try:
    with Image.open(io.BytesIO(data)) as im:
      fmt = im.format
      im.verify()
    if fmt not in _DECODABLE_FORMATS:
      return ('cannot be decoded',
              f'it is a {fmt} image, which tf.io.decode_image does not read')
    with Image.open(io.BytesIO(data)) as im:
      if fmt in ('JPEG', 'MPO'):
        im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
      im.load()
  except Image.UnidentifiedImageError:
    return 'cannot be decoded', 'cannot identify image file'
  except Exception as e:  # pylint: disable=broad-except
    return 'cannot be decoded', _clean_reason(e, path)
  return None


def _bad_file_message(path: str, verb: str, reason: str, others: int) -> str:
  extra = ''
  if others:
    extra = (f' ({others} other file{"s" if others > 1 else ""} in the folder '
             'also fail)')
  return f'Image file {path} {verb} ({reason}){extra}; {_FIX}.'


def _resolve_boundary(token: Optional[str], n: int, default: int) -> int:
  if token is None:
    return default
  if token.endswith('%'):
    pct = int(token[:-1])
    if not -100 <= pct <= 100:
      raise ValueError('percent')
    value = int(round(abs(pct) * n / 100.0))
    value = -value if pct < 0 else value
  else:
    value = int(token)
  if value < 0:
    value += n
  return min(max(value, 0), n)


class FolderSource:
  """Images in ``root/[split/]<class>/...`` as (path, label) lists/tf.data.

  Attributes:
    root: absolute root path.
    class_names: sorted class subfolder names; label = index in this list.
    num_classes: len(class_names).
    split_names: available split names (``val`` is accepted for
      ``validation``).
    skipped: absolute paths of files left out as corrupt (skip_corrupt=True).
    skipped_counts: {reason in SKIP_REASONS: count} of every file under the
      root that is not an example (only non-zero counts), logged as one line.
  """

  def __init__(self, root: str, *, skip_corrupt: bool = False,
               cache_dir: Optional[str] = None):
    self.skip_corrupt = skip_corrupt
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    self.root = root
    if not os.path.exists(root):
      raise ValueError(
          f'Dataset folder {root} does not exist; point config.dataset = '
          f'"folder:<path>" at an existing directory of class subfolders.')
    if not os.path.isdir(root):
      raise ValueError(
          f'Dataset path {root} is not a directory; point config.dataset = '
          f'"folder:<path>" at a directory of class subfolders.')

    # --- Layout. ---
    top = _subdirs(root)
    split_dirs: Dict[str, str] = {}  # canonical split -> absolute dir.
    for name in top:
      canon = SPLIT_ALIASES.get(name.lower())
      if canon is None:
        continue
      if canon in split_dirs:
        raise ValueError(
            f'Dataset folder {root} has two folders for split {canon!r} '
            f'({os.path.basename(split_dirs[canon])} and {name}); merge them '
            'into one.')
      split_dirs[canon] = os.path.join(root, name)
    if split_dirs and any(_subdirs(d) for d in split_dirs.values()):
      others = [n for n in top if SPLIT_ALIASES.get(n.lower()) is None]
      if others:
        logging.warning('Dataset folder %s uses split subfolders; ignoring '
                        'its other subfolders %s.', root, others)
      self.has_split_folders = True
    else:
      split_dirs = {'train': root}
      self.has_split_folders = False

    # --- Scan: split -> class -> sorted relative file paths. ---
    scanned_dirs: List[Tuple[str, int]] = [('.', os.stat(root).st_mtime_ns)]
    files: Dict[str, Dict[str, List[str]]] = {}
    # Files left out, by reason (logged once, below).
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for d in {root, *split_dirs.values()}:
      with os.scandir(d) as it:
        for e in it:
          if e.is_file():
            skipped['hidden' if _is_hidden(e.name)
                    else 'outside a class folder'] += 1
    for split, split_dir in sorted(split_dirs.items()):
      real_files: Dict[str, str] = {}  # Real path -> the class folder that has it.
      classes = _subdirs(split_dir)
      if not classes:
        if self.has_split_folders:
          raise ValueError(
              f'Split folder {split_dir} has no class subfolders; put its '
              f'images in {split_dir}{os.sep}<class_name>{os.sep} or remove '
              'it.')
        raise ValueError(
            f'Dataset folder {root} has no class subfolders; put each '
            f'class\'s images in {root}{os.sep}<class_name>{os.sep}, or in '
            f'{root}{os.sep}<split>{os.sep}<class_name>{os.sep} with split '
            'folders train, validation (or val) and test.')
      if split_dir != root:
        scanned_dirs.append((os.path.relpath(split_dir, root),
                             os.stat(split_dir).st_mtime_ns))
      files[split] = {}
      for cls in classes:
        cls_dir = os.path.join(split_dir, cls)
        rel: List[str] = []
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
          dirnames[:] = sorted(
              d for d in dirnames if not _is_hidden(d) and
              _follow_dir(os.path.join(dirpath, d), cls_dir, root))
          scanned_dirs.append((os.path.relpath(dirpath, root),
                               os.stat(dirpath).st_mtime_ns))
          for fn in filenames:
            path = os.path.join(dirpath, fn)
            if _is_hidden(fn):
              skipped['hidden'] += 1
            elif os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
              skipped['not an image extension'] += 1
            elif _claim(real_files, path, cls_dir):
              rel.append(os.path.relpath(path, root))
            else:
              skipped['linked twice'] += 1
        rel.sort()
        if not rel:
          raise ValueError(
              f'Class folder {cls_dir} is empty (no '
              f'{"/".join(IMAGE_EXTENSIONS)} files); add images to it or '
              'remove it.')
        files[split][cls] = rel

    # --- Validate (or load the cached validation result). ---
    all_rel = [p for s in files.values() for c in s.values() for p in c]
    bad = self._validate(all_rel, scanned_dirs, cache_dir)
    self.skipped: List[str] = []
    if bad:
      first = min(bad)
      if not skip_corrupt:
        verb, reason = bad[first]
        raise ValueError(_bad_file_message(
            os.path.join(root, first), verb, reason, len(bad) - 1))
      self.skipped = sorted(os.path.join(root, p) for p in bad)
      for verb, reason in bad.values():
        skipped['empty' if reason == _EMPTY else
                'unreadable' if verb == 'cannot be read' else 'undecodable'] += 1
      for split in files:
        for cls, rel in files[split].items():
          kept = [p for p in rel if p not in bad]
          if not kept:
            raise ValueError(
                f'Class folder {os.path.join(split_dirs[split], cls)} has no '
                f'usable images (all {len(rel)} were skipped as corrupt); '
                'add images to it or remove it.')
          files[split][cls] = kept
    self.skipped_counts = {k: n for k, n in skipped.items() if n}
    if self.skipped_counts:
      counts = ', '.join(f'{n} {k}' for k, n in self.skipped_counts.items())
      example = f' (e.g. {self.skipped[0]})' if self.skipped else ''
      log = logging.warning if self.skipped else logging.info
      total = sum(self.skipped_counts.values())
      log('Dataset folder %s: skipped %d file%s: %s%s.', root, total,
          '' if total == 1 else 's', counts, example)

    self.class_names: List[str] = sorted(
        {c for s in files.values() for c in s})
    self.num_classes = len(self.class_names)
    label_of = {c: i for i, c in enumerate(self.class_names)}

    # --- Fixed interleaved order per split. ---
    self._splits: Dict[str, List[Tuple[str, int]]] = {}
    for split, by_class in files.items():
      keyed = []
      for cls, rel in by_class.items():
        seed = zlib.crc32(f'{split}/{cls}'.encode('utf-8'))
        perm = np.random.RandomState(seed).permutation(len(rel))
        k = len(rel)
        for j, idx in enumerate(perm):
          keyed.append(((j + 0.5) / k, label_of[cls],
                        os.path.join(root, rel[idx])))
      keyed.sort(key=lambda t: (t[0], t[1]))
      self._splits[split] = [(p, lab) for _, lab, p in keyed]
    self.split_names: List[str] = [
        s for s in ('train', 'validation', 'test') if s in self._splits]

  # ------------------------------------------------------------------ #

  def _validate(self, rel_paths: Sequence[str],
                scanned_dirs: Sequence[Tuple[str, int]],
                cache_dir: Optional[str]) -> Dict[str, Tuple[str, str]]:
    """Returns {relative path: (verb, reason)} for files that fail."""
    fingerprint = hashlib.sha1(json.dumps(
        [_CACHE_VERSION, self.root, sorted(scanned_dirs), list(rel_paths)]
    ).encode('utf-8')).hexdigest()
    cache_file = None
    if cache_dir:
      key = hashlib.sha1(self.root.encode('utf-8')).hexdigest()[:16]
      cache_file = os.path.join(os.fspath(cache_dir), f'folder_{key}.json')
      try:
        with open(cache_file) as f:
          cached = json.load(f)
        if (cached.get('version') == _CACHE_VERSION
            and cached.get('root') == self.root
            and cached.get('fingerprint') == fingerprint):
          self.cache_hit = True
          return {p: tuple(v) for p, v in cached['bad'].items()}
      except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    self.cache_hit = False

    abs_paths = [os.path.join(self.root, p) for p in rel_paths]
    if len(abs_paths) > 64:
      workers = min(32, (os.cpu_count() or 1) * 2)
      with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(check_image, abs_paths, chunksize=64))
    else:
      results = [check_image(p) for p in abs_paths]
    bad = {rel: res for rel, res in zip(rel_paths, results) if res is not None}

    if cache_file:
      try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f'{cache_file}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
          json.dump({'version': _CACHE_VERSION, 'root': self.root,
                     'fingerprint': fingerprint, 'num_files': len(rel_paths),
                     'bad': {p: list(v) for p, v in bad.items()}}, f)
        os.replace(tmp, cache_file)
      except OSError as e:
        logging.warning('Could not write image-check cache %s: %s',
                        cache_file, e)
    return bad

  def _parse(self, split_name: str) -> Tuple[str, Optional[str],
                                             Optional[str]]:
    m = _SLICE_RE.match(split_name)
    if not m:
      raise ValueError(
          f'Split {split_name!r} for dataset folder {self.root} is not '
          'understood; use a split name with an optional slice such as '
          'train, train[:90%], train[90%:] or train[:100].')
    name = m.group('name')
    canon = SPLIT_ALIASES.get(name.lower())
    if canon not in self._splits:
      avail = ', '.join(repr(s) for s in self.split_names)
      hint = ''
      if not self.has_split_folders:
        hint = (' (the folder has no train/validation/test subfolders, so '
                'all its images form \'train\', and a slice such as '
                'train[90%:] can be held out)')
      raise ValueError(
          f'Unknown split {name!r} for dataset folder {self.root}; use one of '
          f'the available splits {avail}{hint}.')
    return canon, m.group('start'), m.group('stop')

  def split(self, split_name: str) -> List[Tuple[str, int]]:
    """(absolute path, label) pairs of a split or slice, in fixed order."""
    canon, start, stop = self._parse(split_name)
    items = self._splits[canon]
    n = len(items)
    try:
      lo = _resolve_boundary(start, n, 0)
      hi = _resolve_boundary(stop, n, n)
    except ValueError:
      raise ValueError(
          f'Split {split_name!r} for dataset folder {self.root} has a '
          'percentage outside -100%..100%; use e.g. train[:90%].') from None
    if lo >= hi:
      raise ValueError(
          f'Split {split_name!r} of dataset folder {self.root} selects no '
          f'examples (the split has {n}); use a larger slice.')
    return list(items[lo:hi])

  def num_examples(self, split_name: str) -> int:
    return len(self.split(split_name))

  def as_dataset(self, split_name: str, *, shuffle_files: bool = False,
                 seed: Optional[int] = None,
                 shard: Optional[Tuple[int, int]] = None,
                 num_parallel_reads: int = tf.data.AUTOTUNE
                 ) -> tf.data.Dataset:
    """tf.data of {'image': encoded bytes, 'label': int64, 'path': string}.

    Args:
      split_name: split with optional slice, e.g. 'train[:90%]'.
      shuffle_files: shuffle the file list (whole list, reshuffled every
        epoch) before reading; images are then read in that order.
      seed: shuffle seed.
      shard: (index, count): keep every count-th file starting at index
        (applied before shuffling, e.g. one shard per host).
      num_parallel_reads: parallelism of the file reads.

    Images are not decoded; use ``decode_rgb`` on 'image'.
    """
    items = self.split(split_name)
    paths = [p for p, _ in items]
    labels = np.asarray([lab for _, lab in items], np.int64)
    ds = tf.data.Dataset.from_tensor_slices(
        {'path': tf.constant(paths, tf.string),
         'label': tf.constant(labels, tf.int64)})
    if shard is not None:
      index, count = shard
      ds = ds.shard(count, index)
    if shuffle_files:
      ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def read(ex):
      return {'image': tf.io.read_file(ex['path']), 'label': ex['label'],
              'path': ex['path']}

    return ds.map(read, num_parallel_calls=num_parallel_reads,
                  deterministic=True)

  def __repr__(self) -> str:
    sizes = ', '.join(f'{s}={len(self._splits[s])}' for s in self.split_names)
    return (f'FolderSource({self.root!r}, classes={self.num_classes}, '
            f'{sizes}, skipped={len(self.skipped)})')
