"""Tests for the data sources: mixer_digits (TFDS) and FolderSource."""

import io
import os
import socket

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax.datasets import digits
from mixer_jax.datasets import folder
from mixer_jax.datasets.folder import FolderSource, decode_rgb


# --------------------------------------------------------------------------
# mixer_digits
# --------------------------------------------------------------------------


def _no_network(*args, **kwargs):
  raise AssertionError(f'network access attempted: {args!r}')


def _prepare_offline(data_dir, plain_tfds=False):
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'create_connection', _no_network)
    mp.setattr(socket, 'getaddrinfo', _no_network)
    if plain_tfds:  # The stock TFDS entry points, default download config.
      builder = tfds.builder('mixer_digits', data_dir=str(data_dir))
      builder.download_and_prepare()
      return tfds.builder('mixer_digits', data_dir=str(data_dir))
    return digits.prepare(str(data_dir))


def _load_split(builder, split):
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


@pytest.fixture(scope='module')
def digits_dirs(tmp_path_factory):
  return (tmp_path_factory.mktemp('tfds_a'), tmp_path_factory.mktemp('tfds_b'))


@pytest.fixture(scope='module')
def digits_builder(digits_dirs):
  return _prepare_offline(digits_dirs[0])


def test_digits_registered_and_reusable(digits_builder, digits_dirs):
  builder = tfds.builder('mixer_digits', data_dir=str(digits_dirs[0]))
  assert builder.is_prepared()
  assert str(builder.version) == '1.0.0'
  # Preparing again finds the prepared data.
  again = _prepare_offline(digits_dirs[0])
  assert again.info.splits['train'].num_examples == 1442


def test_digits_counts(digits_builder):
  splits = digits_builder.info.splits
  assert splits['train'].num_examples == digits.SPLIT_SIZES['train'] == 1442
  assert splits['test'].num_examples == digits.SPLIT_SIZES['test'] == 355
  assert 1442 + 355 == digits.NUM_EXAMPLES == 1797
  assert digits_builder.info.features['label'].names == [
      str(i) for i in range(10)]
  for split in ('train', 'test'):
    d = _load_split(digits_builder, split)
    counts = np.bincount(d['label'], minlength=10)
    assert tuple(counts) == digits.CLASS_COUNTS[split]
    assert (counts > 0).all()
    assert len(set(d['id'].tolist())) == len(d['id'])


def test_digits_pixels(digits_builder):
  from sklearn.datasets import load_digits
  raw = load_digits()
  d = _load_split(digits_builder, 'train')
  img = d['image']
  assert img.dtype == np.uint8 and img.shape[1:] == (8, 8, 3)
  assert img.min() == 0 and img.max() == 255
  np.testing.assert_array_equal(img[..., 0], img[..., 1])
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  expected = np.floor(raw.images[d['id']] * 255 / 16 + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(img[..., 0], expected)
  np.testing.assert_array_equal(d['label'], raw.target[d['id']])


def test_digits_split_rule_and_determinism(digits_builder, digits_dirs):
  from sklearn.datasets import load_digits
  y = load_digits().target
  expected_test = set()
  for c in range(10):
    idx = np.sort(np.flatnonzero(y == c))
    expected_test |= set(idx[4::5].tolist())
  other = _prepare_offline(digits_dirs[1], plain_tfds=True)
  for split in ('train', 'test'):
    a = _load_split(digits_builder, split)
    b = _load_split(other, split)
    np.testing.assert_array_equal(a['id'], b['id'])  # Same order too.
    np.testing.assert_array_equal(a['image'], b['image'])
    ids = set(a['id'].tolist())
    if split == 'test':
      assert ids == expected_test
    else:
      assert not ids & expected_test and len(ids) == 1797 - 355


# --------------------------------------------------------------------------
# FolderSource
# --------------------------------------------------------------------------


def _img(path, mode='RGB', size=(12, 10), seed=0, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.RandomState(seed)
  arr = rng.randint(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
  im = Image.fromarray(arr, 'RGBA').convert(mode)
  im.save(path, format=fmt)
  return str(path)


def _flat_tree(root, per_class=4):
  for c, cls in enumerate(['dog', 'cat', 'bird']):
    for i in range(per_class):
      ext = ['.jpg', '.png', '.JPG', '.jpeg'][i % 4]
      fmt = 'JPEG' if ext.lower() in ('.jpg', '.jpeg') else 'PNG'
      _img(root / cls / f'{i:03d}{ext}', seed=10 * c + i, fmt=fmt)
  return root


def test_folder_flat_layout(tmp_path):
  root = _flat_tree(tmp_path / 'flat')
  gray = _img(root / 'cat' / 'gray.png', mode='L')
  rgba = _img(root / 'dog' / 'rgba.png', mode='RGBA')
  _img(root / 'bird' / 'pal.gif', mode='P', fmt='GIF')
  _img(root / 'bird' / 'x.bmp', fmt='BMP')
  (root / 'bird' / 'notes.txt').write_text('not an image')
  _img(root / 'cat' / '.hidden.png')
  src = FolderSource(str(root))
  assert src.class_names == ['bird', 'cat', 'dog']
  assert src.num_classes == 3
  assert src.split_names == ['train']
  items = src.split('train')
  assert len(items) == src.num_examples('train') == 12 + 4
  for path, label in items:
    assert os.path.isabs(path)
    assert os.path.basename(os.path.dirname(path)) == src.class_names[label]
  assert (gray, 1) in items and (rgba, 2) in items
  assert not any(p.endswith(('.txt', '.hidden.png')) for p, _ in items)
  assert src.skipped == []

  ds = src.as_dataset('train')
  assert ds.element_spec['image'].dtype == tf.string
  assert ds.element_spec['label'].dtype == tf.int64
  seen = [(ex['path'].decode(), int(ex['label']))
          for ex in tfds.as_numpy(ds)]
  assert seen == items  # Fixed order, unshuffled.


def test_folder_decode_rgb(tmp_path):
  root = tmp_path / 'modes'
  paths = {
      'gray': _img(root / 'a' / 'gray.png', mode='L', size=(7, 5)),
      'rgba': _img(root / 'a' / 'rgba.png', mode='RGBA', size=(7, 5)),
      'la': _img(root / 'a' / 'la.png', mode='LA', size=(7, 5)),
      'gif': _img(root / 'a' / 'p.gif', mode='P', size=(7, 5), fmt='GIF'),
      'jpg_gray': _img(root / 'b' / 'g.jpg', mode='L', size=(7, 5)),
      'bmp': _img(root / 'b' / 'x.bmp', size=(7, 5)),
  }
  src = FolderSource(str(root))
  ds = src.as_dataset('train').map(lambda ex: decode_rgb(ex['image']))
  assert ds.element_spec.shape.as_list() == [None, None, 3]
  images = list(tfds.as_numpy(ds))
  assert len(images) == len(paths)
  for im in images:
    assert im.shape == (5, 7, 3) and im.dtype == np.uint8
  gray = decode_rgb(tf.io.read_file(paths['gray'])).numpy()
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.open(paths['gray'])))
  rgba = decode_rgb(tf.io.read_file(paths['rgba'])).numpy()
  np.testing.assert_array_equal(
      rgba, np.asarray(Image.open(paths['rgba']))[..., :3])


def test_folder_split_layout_and_val_alias(tmp_path):
  root = tmp_path / 'splits'
  for split, n in (('train', 3), ('val', 2), ('test', 1)):
    for cls in ('x', 'y'):
      for i in range(n):
        _img(root / split / cls / f'{i}.png')
  _img(root / 'test' / 'z' / '0.png')  # Class only present in test.
  src = FolderSource(str(root))
  assert src.split_names == ['train', 'validation', 'test']
  assert src.class_names == ['x', 'y', 'z']
  assert src.num_examples('train') == 6
  assert src.split('val') == src.split('validation')
  assert src.num_examples('val') == 4
  assert src.num_examples('test') == 3
  assert all('/val/' in p for p, _ in src.split('validation'))
  assert sorted(lab for _, lab in src.split('test')) == [0, 1, 2]


def test_folder_slicing(tmp_path):
  root = tmp_path / 'slices'
  for c, cls in enumerate(('a', 'b', 'c')):
    for i in range(10 + 3 * c):
      _img(root / cls / f'{i:02d}.png', size=(2, 2), seed=i)
  src = FolderSource(str(root))
  full = src.split('train')
  n = len(full)
  assert n == 10 + 13 + 16
  first, second = src.split('train[:50%]'), src.split('train[50%:]')
  assert len(first) == int(round(n * 0.5))
  assert not set(first) & set(second)
  assert first + second == full
  for part in (first, second, src.split('train[:6]')):
    assert {lab for _, lab in part} == {0, 1, 2}  # Interleaved classes.
  assert len(src.split('train[:100]')) == n  # Count past the end clips.
  assert src.split('train[:5]') == full[:5]
  assert src.split('train[-5:]') == full[-5:]
  assert src.split('train[:90%]') + src.split('train[90%:]') == full
  # Deterministic across constructions, and not plain sorted order.
  assert FolderSource(str(root)).split('train[:50%]') == first
  assert [p for p, _ in full] != sorted(p for p, _ in full)
  for bad in ('train[::2]', 'train[a:]', 'train[:200%]', 'train[5:5]'):
    with pytest.raises(ValueError) as e:
      src.split(bad)
    assert str(root) in str(e.value)


def _assert_one_sentence(msg, path):
  assert str(path) in msg, msg
  assert '\n' not in msg and msg.endswith('.'), msg
  assert msg.count('; ') == 1, msg  # "<problem>; <fix>."


def test_folder_errors(tmp_path):
  missing = tmp_path / 'missing'
  with pytest.raises(ValueError) as e:
    FolderSource(str(missing))
  _assert_one_sentence(str(e.value), missing)
  assert 'does not exist' in str(e.value)

  no_classes = tmp_path / 'no_classes'
  _img(no_classes / 'loose.png')
  with pytest.raises(ValueError) as e:
    FolderSource(str(no_classes))
  _assert_one_sentence(str(e.value), no_classes)
  assert 'no class subfolders' in str(e.value)

  empty_class = tmp_path / 'empty_class'
  _img(empty_class / 'a' / '0.png')
  (empty_class / 'b').mkdir()
  (empty_class / 'b' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError) as e:
    FolderSource(str(empty_class))
  _assert_one_sentence(str(e.value), empty_class / 'b')
  assert 'empty' in str(e.value)

  empty_split = tmp_path / 'empty_split'
  _img(empty_split / 'train' / 'a' / '0.png')
  (empty_split / 'test').mkdir()
  with pytest.raises(ValueError) as e:
    FolderSource(str(empty_split))
  _assert_one_sentence(str(e.value), empty_split / 'test')

  src = FolderSource(str(empty_split / 'train'))
  with pytest.raises(ValueError) as e:
    src.split('test')
  msg = str(e.value)
  assert str(empty_split / 'train') in msg and "'train'" in msg
  assert 'Unknown split' in msg and '\n' not in msg


def test_folder_corrupt_files(tmp_path):
  root = _flat_tree(tmp_path / 'corrupt')
  garbage = root / 'cat' / 'garbage.jpg'
  garbage.write_bytes(b'this is not an image')
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(0).randint(
      0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, 'JPEG')
  truncated = root / 'dog' / 'truncated.jpg'
  truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

  with pytest.raises(ValueError) as e:
    FolderSource(str(root))
  msg = str(e.value)
  _assert_one_sentence(msg, garbage)  # First bad file in sorted order.
  assert 'cannot be decoded' in msg and 'skip_corrupt_images=True' in msg
  assert '1 other file' in msg

  # The truncated JPEG alone is caught as well.
  garbage.unlink()
  with pytest.raises(ValueError) as e:
    FolderSource(str(root))
  _assert_one_sentence(str(e.value), truncated)
  garbage.write_bytes(b'this is not an image')

  src = FolderSource(str(root), skip_corrupt=True)
  assert src.skipped == sorted([str(garbage), str(truncated)])
  assert src.num_examples('train') == 12
  assert str(garbage) not in {p for p, _ in src.split('train')}

  # A class whose only images are corrupt is reported as having none.
  lone = tmp_path / 'lone'
  _img(lone / 'ok' / '0.png')
  (lone / 'bad').mkdir()
  (lone / 'bad' / '0.png').write_bytes(b'\x89PNG broken')
  with pytest.raises(ValueError) as e:
    FolderSource(str(lone), skip_corrupt=True)
  _assert_one_sentence(str(e.value), lone / 'bad')


def test_folder_check_cache(tmp_path, monkeypatch):
  root = _flat_tree(tmp_path / 'cached')
  bad = root / 'bird' / 'bad.png'
  bad.write_bytes(b'nope')
  cache = tmp_path / 'cache'
  calls = []
  real_check = folder.check_image
  monkeypatch.setattr(folder, 'check_image',
                      lambda p: calls.append(p) or real_check(p))

  with pytest.raises(ValueError):
    FolderSource(str(root), cache_dir=str(cache))
  assert len(calls) == 13 and len(os.listdir(cache)) == 1
  calls.clear()
  src = FolderSource(str(root), cache_dir=str(cache), skip_corrupt=True)
  assert src.cache_hit and not calls  # Reused, no file re-checked.
  assert src.skipped == [str(bad)]

  _img(root / 'dog' / 'new.png')  # Changes the listing: re-check.
  src = FolderSource(str(root), cache_dir=str(cache), skip_corrupt=True)
  assert not src.cache_hit and len(calls) == 14
  assert src.num_examples('train') == 13


def test_folder_skipped_files_counted_by_reason(tmp_path, caplog):
  root = _flat_tree(tmp_path / 'junk', per_class=1)
  (root / 'notes.txt').write_text('x')
  (root / 'cat' / '.DS_Store').write_bytes(b'x')
  (root / 'cat' / 'labels.csv').write_text('x')
  (root / 'dog' / 'labels.csv').write_text('x')
  (root / 'dog' / 'empty.png').write_bytes(b'')
  (root / 'bird' / 'garbage.jpg').write_bytes(b'not an image')
  caplog.set_level('INFO')
  src = FolderSource(str(root), skip_corrupt=True)
  assert src.skipped_counts == {'outside a class folder': 1, 'hidden': 1,
                                'not an image extension': 2, 'empty': 1,
                                'undecodable': 1}
  lines = [r.getMessage() for r in caplog.records if 'skipped' in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith(
      f'Dataset folder {root}: skipped 6 files: 1 outside a class folder, 1 hidden, '
      '2 not an image extension, 1 empty, 1 undecodable (e.g. ')


# --------------------------------------------------------------------------
# mixer_fashion_mnist (from IDX files the test writes; no Debian package needed)
# --------------------------------------------------------------------------

from mixer_jax import errors  # noqa: E402
from mixer_jax import input_pipeline  # noqa: E402
from mixer_jax.datasets import fashion_mnist  # noqa: E402

FASHION_SIZES = {'train': 7, 'test': 3}


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(n).to_bytes(4, 'big') for n in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _fashion_arrays(split):
  n = FASHION_SIZES[split]
  rng = np.random.default_rng(len(split))
  return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
          (np.arange(n) * 3 + len(split)) % 10)


def _write_fashion(directory, gz=True, override=None):
  """The four IDX files (train gzipped when `gz`, test plain); `override` maps a file
  stem to the bytes to write instead."""
  import gzip
  os.makedirs(directory, exist_ok=True)
  for split, (image_stem, label_stem) in fashion_mnist.FILES.items():
    images, labels = _fashion_arrays(split)
    for stem, data in ((image_stem, _idx_bytes(images)), (label_stem, _idx_bytes(labels))):
      data = (override or {}).get(stem, data)
      if gz and split == 'train':
        with gzip.open(os.path.join(directory, stem + '.gz'), 'wb') as f:
          f.write(data)
      else:
        with open(os.path.join(directory, stem), 'wb') as f:
          f.write(data)
  return str(directory)


def test_fashion_mnist_prepares_offline_from_idx_files(tmp_path):
  manual = _write_fashion(tmp_path / 'idx')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'getaddrinfo', _no_network)
    source = input_pipeline._TfdsSource(fashion_mnist.NAME, str(tmp_path / 'tfds'), manual)
  assert source.class_names == list(fashion_mnist.CLASSES) and source.num_classes == 10
  for split, n in FASHION_SIZES.items():
    assert source.split_size(split) == n
    images, labels = _fashion_arrays(split)
    data = _load_split(source.builder, split)
    order = np.argsort(data['id'])
    np.testing.assert_array_equal(data['id'][order], np.arange(n))
    np.testing.assert_array_equal(data['label'][order], labels)
    np.testing.assert_array_equal(data['image'][order][..., 0], images)
  # The training path decodes the stored grey image to 3 equal channels (example
  # indices follow the record order, which TFDS shuffles by key).
  examples = source.examples('train', in_memory=True)
  position = int(np.flatnonzero(_load_split(source.builder, 'train')['id'] == 2)[0])
  rgb = input_pipeline.decode.decode_rgb(
      examples.lookup(tf.constant(position, tf.int64))['image']).numpy()
  images, _ = _fashion_arrays('train')
  for channel in range(3):
    np.testing.assert_array_equal(rgb[..., channel], images[2])
  # Prepared once: a second source reuses it without the IDX files.
  again = input_pipeline._TfdsSource(fashion_mnist.NAME, str(tmp_path / 'tfds'),
                                     str(tmp_path / 'gone'))
  assert again.split_size('test') == 3


_IMAGES = fashion_mnist.FILES['train'][0]
_LABELS = fashion_mnist.FILES['train'][1]


@pytest.mark.parametrize('override,expected', [
    ({_IMAGES: _idx_bytes(_fashion_arrays('train')[0])[:-5]},
     f'holds {16 + 7 * 28 * 28 - 5} bytes but its header [7, 28, 28] needs'),
    ({_IMAGES: b'\x00\x00\x0d\x03' + bytes(12)}, 'is not an unsigned-byte IDX file'),
    ({_IMAGES: b'\x00\x00'}, 'too few for an IDX header'),
    ({_LABELS: _idx_bytes(np.zeros(6, np.uint8))}, 'hold 7 images but 6 labels'),
    ({_LABELS: _idx_bytes(np.full(7, 10, np.uint8))}, 'holds label 10'),
    ({_IMAGES: _idx_bytes(np.zeros((7, 28, 27), np.uint8))}, 'not [N, 28, 28] images'),
])
def test_fashion_mnist_bad_files_are_one_sentence(tmp_path, override, expected):
  manual = _write_fashion(tmp_path / 'idx', override=override)
  with pytest.raises(errors.DataError) as e:
    input_pipeline._TfdsSource(fashion_mnist.NAME, str(tmp_path / 'tfds'), manual)
  message = str(e.value)
  assert expected in message and 'dataset-fashion-mnist' in message
  assert len(message.strip().splitlines()) == 1


def test_fashion_mnist_missing_or_corrupt_files(tmp_path):
  with pytest.raises(errors.DataError, match=r'is not in .*apt-get install '
                                             r'dataset-fashion-mnist'):
    input_pipeline._TfdsSource(fashion_mnist.NAME, str(tmp_path / 'tfds'),
                               str(tmp_path / 'empty'))
  manual = _write_fashion(tmp_path / 'idx')
  path = os.path.join(manual, _IMAGES + '.gz')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:  # A download cut short: the gzip stream ends early.
    f.write(data[:len(data) // 2])
  with pytest.raises(errors.DataError, match='cannot be read'):
    input_pipeline._TfdsSource(fashion_mnist.NAME, str(tmp_path / 'tfds'), manual)
  # Nothing half-prepared is left to be mistaken for the dataset.
  assert not tfds.builder(fashion_mnist.NAME, data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_tfds_fashion_mnist_name_points_to_the_offline_builder(tmp_path):
  with pytest.raises(errors.DataError, match='--config.dataset=mixer_fashion_mnist'):
    input_pipeline._TfdsSource('fashion_mnist', str(tmp_path / 'tfds'))


def test_fashion_mnist_trains_and_evaluates_through_the_entry_points(tmp_path):
  """The config's data settings (3-channel decode, shift, flip) on tiny IDX files:
  train a few steps, then evaluate the workdir with the confusion matrix."""
  from conftest import TINY_MODEL
  from configs import fashion_mnist as fashion_config
  from mixer_jax import evaluate
  from mixer_jax import train
  manual = _write_fashion(tmp_path / 'idx')
  config = fashion_config.get_config()
  config.data_dir, config.manual_dir = str(tmp_path / 'tfds'), manual
  for key, value in dict(TINY_MODEL, patch_size=7).items():
    config.model[key] = value
  config.batch_size, config.eval_batch_size, config.num_train_steps = 4, 4, 2
  config.warmup_steps, config.log_every_steps = 1, 1
  config.eval_every_steps = config.checkpoint_every_steps = 2
  config.log_image_grid = False
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['num_examples'] == FASHION_SIZES['test']
  evaluated = evaluate.evaluate(config, str(tmp_path / 'run'), confusion=True)
  matrix = np.asarray(evaluated['confusion'])
  _, labels = _fashion_arrays('test')
  np.testing.assert_array_equal(matrix.sum(1), np.bincount(labels, minlength=10))
  assert np.trace(matrix) / 3 == pytest.approx(evaluated['top1'])
  assert evaluated['top1'] == pytest.approx(result['accuracy'])
  assert evaluated['class_names'] == list(fashion_mnist.CLASSES)


def test_folder_symlink_loop_refused(tmp_path):
  # Issue 31: `ln -s .. F/a/loop` multiplied the images (492 from 12) and counted
  # class b's files under a too.
  root = _flat_tree(tmp_path / 'loop', per_class=2)
  os.symlink('..', root / 'cat' / 'loop')
  with pytest.raises(ValueError) as e:
    FolderSource(str(root))
  assert str(e.value) == (
      f'Dataset folder {root}: {root / "cat" / "loop"} is a symbolic link to {root}, '
      'which contains it (a loop that would list the same images again and again); '
      'remove the link.')


def test_folder_symlink_to_another_class_refused(tmp_path):
  root = _flat_tree(tmp_path / 'cross', per_class=2)
  os.symlink(root / 'dog', root / 'cat' / 'dogs')
  with pytest.raises(ValueError, match='another part of the same dataset'):
    FolderSource(str(root))
  os.remove(root / 'cat' / 'dogs')
  os.symlink(root / 'dog' / '000.jpg', root / 'cat' / 'a_dog.jpg')
  with pytest.raises(ValueError, match='reached from two class folders'):
    FolderSource(str(root))


def test_folder_links_out_of_the_root_followed_once(tmp_path):
  root = _flat_tree(tmp_path / 'out', per_class=2)
  outside = tmp_path / 'extra'
  _img(outside / 'x.png', seed=99)
  _img(outside / 'y.png', seed=98)
  os.symlink(outside, root / 'cat' / 'more')
  os.symlink(outside, root / 'cat' / 'again')  # The same real files a second time.
  src = FolderSource(str(root))
  assert src.num_examples('train') == 6 + 2
  assert src.skipped_counts == {'linked twice': 2}
  cat = src.class_names.index('cat')
  assert sorted(os.path.basename(p) for p, label in src.split('train')
                if label == cat) == ['000.jpg', '001.png', 'x.png', 'y.png']


# ------------------------------------------------- the table of how to prepare
class _Unprepared:
  """What datasets.prepare reads of a TFDS builder that is not prepared."""

  def __init__(self, data_dir, builder_config=None):
    self.data_dir, self.builder_config = data_dir, builder_config
    self.prepared_with = None

  def download_and_prepare(self, **kwargs):
    self.prepared_with = kwargs


def test_the_table_prepares_ours_and_refuses_the_rest_in_one_sentence(tmp_path):
  import mixer_jax.datasets as registry
  from mixer_jax import errors
  builder = _Unprepared(str(tmp_path / 'mixer_digits' / '1.0.0'))
  registry.prepare(builder, 'mixer_digits')
  assert builder.prepared_with == {}  # Built here, offline.
  with pytest.raises(errors.DataError, match=r"^TFDS dataset fashion_mnist is not prepared in "
                     r".* would need a download; use --config.dataset=mixer_fashion_mnist, "):
    registry.prepare(_Unprepared(str(tmp_path)), 'fashion_mnist:3.0.1')
  with pytest.raises(errors.DataError, match=r"^TFDS dataset cifar10 is not prepared in .*; "
                     r"prepare it on a machine with internet \(`tfds build cifar10 "):
    registry.prepare(_Unprepared(str(tmp_path)), 'cifar10')
  # By its base name, with TFDS's default manual dir DATA_DIR/downloads/manual.
  where = tmp_path / 'imagenet2012' / '5.1.0'
  with pytest.raises(errors.DataError, match=r"ILSVRC2012_img_val.tar in the manual dir .*, "
                     f"here {tmp_path}/downloads/manual, and run again."):
    registry.prepare(_Unprepared(str(where)), 'imagenet2012:5.1.0')


def test_decompression_bomb_is_too_large_not_unreadable(tmp_path):
  # A 20000 x 20000 PNG of 48 KB: refused from its header, in the folder scan and in
  # predict's decode alike, as too large, before anything decodes it.
  from mixer_jax.datasets import decode
  os.makedirs(tmp_path / "a")
  os.makedirs(tmp_path / "b")
  bomb = str(tmp_path / "a" / "bomb.png")
  Image.new("1", (20000, 20000)).save(bomb)
  for c in "ab":
    Image.new("RGB", (8, 8)).save(str(tmp_path / c / "ok.png"))
  assert folder.check_image(bomb) == ("is too large",
                                      "20000 x 20000 pixels, more than 178,956,970")
  with pytest.raises(ValueError, match=r"Image file .*bomb.png is too large \(20000 x 20000 "
                     r"pixels, more than 178,956,970\); remove it or set"):
    FolderSource(str(tmp_path))
  with pytest.raises(ValueError, match=r"bomb.png is too large \(20000 x 20000 pixels"):
    decode.load_rgb(bomb)
