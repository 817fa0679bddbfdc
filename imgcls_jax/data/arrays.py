"""A dataset held as numpy arrays in one ``.npz`` file (``config.data.name='arrays:/path/x.npz'``).

TensorFlow-free from the file to the training step: describing, training batches (on the host or
held on the devices), evaluation batches and run-directory samples are numpy. This is how a
machine without TensorFlow (a GPU image) trains, and how a researcher whose data already is arrays
brings it in. The file holds, per split NAME:

  NAME_images   uint8, N x H x W x C (or N x H x W: one channel); every split the same H, W, C
  NAME_labels   integers in [0, K), shape N (single-label), or 0/1 of shape N x K (multi-label)
  class_names   optional, K strings (default '0' .. 'K-1', K = the largest label + 1)
  mirror_safe   optional bool (default True): False when a horizontal flip changes the meaning
  preprocess    optional string: the eval preprocessing spec that made the stored pixels from the
                decoded image files (write_arrays records its --eval_preprocess; predict and
                serve apply it to a raw file). Absent: not known (images of another size are
                then resized to the stored size, as for any dataset)

``python -m imgcls_jax.data.write_arrays`` writes one from any tfds dataset (TensorFlow needed
there only); ``'arrays:NAME'`` (a bare tfds name, e.g. ``arrays:fashion_mnist``) is the file
``<tfds data_dir>/arrays/NAME.npz``, written from tfds on first use (``arrays:sklearn_digits``, the
default config's, straight from scikit-learn). Splits are named ``NAME``,
``NAME[START:END]`` or ``NAME[A%:B%]`` and select what tfds selects.

Training order: epoch ``e`` is the split permuted by numpy's generator seeded with
``(seed, e)``; a process takes its rows of each global batch, so the global batches do not depend
on the process count, and a run resumed at step ``s`` rebuilds them from ``s``. (Another order
than a tfds dataset's tf.data shuffle: the same data as a tfds dataset and as arrays trains on
different batches.) Augmentation runs on the device (``config.data.device_preprocess``); host
preprocessing, class-balanced sampling, read shards and id-listed splits are for tf.data sources.
"""
from __future__ import annotations

import functools
import math
import logging
import os
import re
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from imgcls_jax.data import arrays_save, sklearn_digits
from imgcls_jax.data.info import ARRAYS_PREFIX, DatasetInfo, arrays_tfds_name, flips_allowed
from imgcls_jax.errors import UserError, first_line

PREFIX = ARRAYS_PREFIX
Batch = dict[str, np.ndarray]
_BOUND = r'(-?\d+(?:\.\d+)?%|-?\d+)?'
SLICE = re.compile(rf'^([A-Za-z0-9_\-]+)(?:\[{_BOUND}:{_BOUND}\])?$')


def is_arrays(data: ml_collections.ConfigDict) -> bool:
  """``config.data.name`` names an arrays file."""
  return str(data.get('name', '')).startswith(PREFIX)


def tfds_name(data: ml_collections.ConfigDict) -> str | None:
  """The tfds dataset that ``'arrays:NAME'`` holds (``info.arrays_tfds_name``)."""
  return arrays_tfds_name(str(data.name))


def path_of(data: ml_collections.ConfigDict) -> str:
  """The absolute path of the ``.npz`` file ``config.data.name`` names: the path itself, or for
  ``'arrays:NAME'`` (a tfds dataset) ``<data_dir>/arrays/NAME.npz`` in tfds's data directory
  (``config.data.data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
  name = tfds_name(data)
  if name is not None:
    root = data.get('data_dir') or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    if '://' in root:
      raise UserError(f"config.data.name='{data.name}' is a local file under the tfds data_dir, "
                      f"which is the URL {root}; set config.data.data_dir to a local directory "
                      "(or name the file: arrays:/local/path.npz).")
    return os.path.abspath(os.path.expanduser(os.path.join(root, 'arrays', f'{name}.npz')))
  path = str(data.name)[len(PREFIX):]
  if not path:
    raise UserError("config.data.name='arrays:' names no file; write 'arrays:/path/to/data.npz' "
                    "or 'arrays:NAME' for a tfds dataset held as arrays (e.g. arrays:fashion_mnist).")
  return os.path.abspath(os.path.expanduser(path))


class ArraysFile:
  """The checked contents of one ``.npz`` file: splits, classes, flip safety."""

  def __init__(self, path: str):
    self.path = path
    where = f"config.data.name='{PREFIX}{path}'"
    try:
      with np.load(path, allow_pickle=False) as z:
        contents = {k: z[k] for k in z.files}
    except FileNotFoundError:
      raise UserError(f'{where}: no such file; write one with `python -m '
                      'imgcls_jax.data.write_arrays --dataset=TFDS_NAME (or --folder=ROOT, '
                      f'--manifest=CSV) --output={path}` (see imgcls_jax/data/write_arrays.py).'
                      ) from None
    except Exception as e:  # zipfile / pickle / OSError: the file is not a usable .npz
      raise UserError(f'{where} is not a readable .npz of arrays ({first_line(e, limit=200)}); '
                      'write it with numpy.savez (see imgcls_jax/data/arrays.py).'
                      ) from None
    names = sorted(k[:-len('_images')] for k in contents if k.endswith('_images'))
    if not names:
      raise UserError(f"{where} holds no 'NAME_images' array (it holds: "
                      f"{', '.join(sorted(contents)) or 'nothing'}); see imgcls_jax/data/arrays.py.")
    self.splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
      self.splits[name] = _checked_split(where, name, contents)
    shapes = {s: im.shape[1:] for s, (im, _) in self.splits.items()}
    if len(set(shapes.values())) > 1:
      raise UserError(f'{where}: splits hold images of different shapes ({shapes}); store every '
                      'split at the size the model reads.')
    multi = {s: lb.ndim == 2 for s, (_, lb) in self.splits.items()}
    if len(set(multi.values())) > 1:
      raise UserError(f'{where}: some splits have one label per image and others multi-hot rows '
                      f'({multi}); store every split the same way.')
    self.multilabel = next(iter(multi.values()))
    if 'class_names' in contents:
      self.class_names = tuple(str(n) for n in np.asarray(contents['class_names']).reshape(-1))
    elif self.multilabel:
      self.class_names = tuple(str(k) for k in range(next(iter(self.splits.values()))[1].shape[1]))
    else:
      top = max((int(lb.max()) for _, lb in self.splits.values() if lb.size), default=-1)
      self.class_names = tuple(str(k) for k in range(top + 1))
    joined = [n for n in self.class_names if ';' in n] if self.multilabel else []
    if joined:
      raise UserError(f"{where}: tag names may not contain ';' ({joined[0]!r}): tag sets are "
                      "written ';'-joined (manifests, label-issue lists); rename the tag.")
    k = len(self.class_names)
    for name, (_, labels) in self.splits.items():
      bad = (labels.shape[1] != k if self.multilabel
             else labels.size and (labels.min() < 0 or labels.max() >= k))
      if bad:
        raise UserError(f"{where}: split '{name}' has labels outside the {k} classes of "
                        "'class_names'; store labels in [0, K) (multi-hot rows of width K).")
    if k < 2:
      raise UserError(f'{where} holds {k} class; a classifier needs at least 2.')
    self.mirror_safe = bool(np.asarray(contents.get('mirror_safe', True)).reshape(-1)[0])
    source = np.asarray(contents.get('source', '')).reshape(-1)   # who wrote it ('' unknown)
    self.source = str(source[0]) if source.size else ''
    recipe = np.asarray(contents['preprocess']).reshape(-1) if 'preprocess' in contents else None
    # None: the file does not say (scikit-learn's digits are stored as decoded: '').
    self.preprocess = (str(recipe[0]) if recipe is not None and recipe.size
                       else '' if self.source == sklearn_digits.SOURCE else None)

  def split(self, spec: str, key: str = '') -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``spec`` ('train', 'train[:50000]', 'train[90%:]'): views, not copies.
    ``key`` (e.g. 'data.eval_split') names the config key it came from in errors."""
    given = f"config.{key}='{spec}'" if key else f"Split '{spec}'"
    known = ', '.join(sorted(self.splits))
    m = SLICE.match(spec)
    if m is None:
      raise UserError(f"{given} does not parse; write NAME, NAME[START:END] or NAME[A%:B%] with "
                      f'NAME one of {known}.')
    name, lo, hi = m.groups()
    if name not in self.splits:
      fix = f'set config.{key} to one of' if key else 'its splits are'
      raise UserError(f"Split '{name}' does not exist in {self.path}; {fix}: {known}.")
    images, labels = self.splits[name]
    n = len(labels)
    start, stop = slice_bound(lo, n, 0), slice_bound(hi, n, n)
    if start is None or stop is None:
      raise UserError(f"{given} reaches past the {n} examples of '{name}'; give bounds within "
                      f'-{n}..{n} (or percentages).')
    if stop <= start:
      raise UserError(f"{given} selects no examples ('{name}' has {n}); give a slice with "
                      f"examples, e.g. '{name}' or '{name}[:50%]'.")
    return images[start:stop], labels[start:stop]


def slice_bound(text: str | None, n: int, default: int) -> int | None:
  """A slice bound as tfds reads one: none (``default``), an integer or a percentage of n rounded
  to the closest example, negative counting from the end; None when it is beyond the split."""
  if not text:
    return default
  value = round(float(text[:-1]) * n / 100) if text.endswith('%') else int(text)
  if abs(value) > n:
    return None
  return n + value if value < 0 else value


def _checked_split(where: str, name: str, contents: dict[str, np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
  images = contents[f'{name}_images']
  if f'{name}_labels' not in contents:
    raise UserError(f"{where} has '{name}_images' but no '{name}_labels'; store both.")
  labels = contents[f'{name}_labels']
  if images.dtype != np.uint8:
    raise UserError(f"{where}: '{name}_images' is {images.dtype}; store uint8 pixels (0-255), "
                    'e.g. (x * 255).round().astype(np.uint8).')
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise UserError(f"{where}: '{name}_images' has shape {images.shape}; store N x H x W x C "
                    '(C = 1, 3 or 4) or N x H x W.')
  if labels.ndim not in (1, 2) or len(labels) != len(images):
    raise UserError(f"{where}: '{name}_labels' has shape {labels.shape} for {len(images)} images; "
                    'store one label per image (shape N) or one multi-hot row (N x K).')
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
    raise UserError(f"{where}: '{name}_labels' is {labels.dtype}; store integer class indices "
                    '(multi-label: 0/1 rows).')
  if labels.ndim == 2:
    if labels.size and (labels.min() < 0 or labels.max() > 1):
      raise UserError(f"{where}: '{name}_labels' rows must be 0/1 (multi-hot).")
    labels = labels.astype(np.uint8)
  else:
    labels = labels.astype(np.int32)
  return images, labels


_OLD_ORDER_WARNED: set[str] = set()   # arrays/sklearn_digits.npz files in tfds's order, named


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float, size: int) -> ArraysFile:
  del mtime, size  # cache keys: a rewritten file is read again
  return ArraysFile(path)


def load(data: ml_collections.ConfigDict) -> ArraysFile:
  """The arrays file of ``config.data`` (read once per process while it is unchanged); for
  ``'arrays:NAME'`` written first when it does not exist yet: from tfds (TensorFlow needed then),
  or for the embedded ``sklearn_digits`` straight from scikit-learn."""
  path, name = path_of(data), tfds_name(data)
  if name is not None and not os.path.exists(path):
    if name == sklearn_digits.NAME:
      arrays_save.save(sklearn_digits.arrays_contents(), path)
    else:
      _write_from_tfds(data, name, path)
  try:
    st = os.stat(path)
  except OSError:
    return ArraysFile(path)  # raises the one-line error
  loaded = _load(path, st.st_mtime, st.st_size)
  if (name == sklearn_digits.NAME and loaded.source != sklearn_digits.SOURCE
      and path not in _OLD_ORDER_WARNED):
    # Written from tfds by an earlier version, in tfds's order: the same examples, but slices
    # such as train[80%:] select others than a fresh machine's file. Runs trained on it read it
    # as they trained (it is never rewritten under them); deleting it gives scikit-learn's order.
    _OLD_ORDER_WARNED.add(path)
    logging.warning("%s was written by an earlier version in tfds's order: its slices (e.g. "
                    "train[80%%:]) select other images than on a fresh machine; runs trained on it "
                    "read it as they trained (deleted, it is written in scikit-learn's order, and "
                    'they would evaluate on other slices).',
                    path)
  return loaded


def _write_from_tfds(data: ml_collections.ConfigDict, name: str, path: str) -> None:
  from imgcls_jax.data import write_arrays  # reads through tf.data, this once
  try:
    write_arrays.write_tfds(data, name, path)
  except ModuleNotFoundError as e:
    if (e.name or '').split('.')[0] not in ('tensorflow', 'tensorflow_datasets'):
      raise
    raise UserError(f"config.data.name='{data.name}' is written from tfds '{name}' on first use, "
                    f'which needs TensorFlow (not installed here); write {path} where it is '
                    f'(python -m imgcls_jax.data.write_arrays --dataset={name} --output={path}) '
                    'and copy it here.') from None


def check(data: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming a setting an arrays dataset does not honour."""
  name = f"config.data.name='{data.name}'"
  if data.get('train_preprocess'):
    raise UserError(f"{name} is augmented on the device: set config.data.train_preprocess='' and "
                    "use config.data.device_preprocess (e.g. 'flip_alternate|translate(pad=2)').")
  if data.get('eval_preprocess'):
    raise UserError(f"{name} is read as stored: set config.data.eval_preprocess='' and store the "
                    'images at the size the model reads.')
  if data.get('balanced_sampling', False):
    raise UserError(f'{name} is read in plain shuffled order; set '
                    'config.data.balanced_sampling=False (weigh classes with config.loss instead).')
  shards = data.get('read_shards', 1)
  if shards not in (None, 1):
    raise UserError(f'{name} is held whole by every process; set config.data.read_shards=1.')
  for key in ('train_split', 'eval_split'):
    if '@' in (data.get(key) or ''):
      raise UserError(f"config.data.{key}='{data[key]}' lists tfds ids; {name} takes NAME or "
                      'NAME[START:END] splits (cross-validation reads tfds datasets and folders).')


def describe(data: ml_collections.ConfigDict) -> DatasetInfo:
  """The ``DatasetInfo`` of ``config.data``'s arrays file and splits."""
  check(data)
  f = load(data)
  if bool(data.get('multilabel', False)) != f.multilabel:
    stored = 'multi-hot rows' if f.multilabel else 'one class per image'
    raise UserError(f'{f.path} stores {stored}; set config.data.multilabel={f.multilabel}.')
  sizes = {}
  for key in ('train_split', 'eval_split'):
    sizes[data[key]] = len(f.split(data[key], f'data.{key}')[1])
  images = f.split(data.train_split)[0]
  h, w, c = (int(d) for d in images.shape[1:])
  # 'arrays:NAME' files are written from tfds as stored (write_tfds): nothing applied.
  made_by = f.preprocess if f.preprocess is not None or tfds_name(data) is None else ''
  return DatasetInfo(name=PREFIX + f.path, num_classes=len(f.class_names),
                     class_names=f.class_names, image_shape=(h, w, c), num_examples=sizes,
                     mirror_safe=f.mirror_safe and flips_allowed(data), multilabel=f.multilabel,
                     stored_preprocess=made_by)


def split_size(data: ml_collections.ConfigDict, split: str) -> int:
  """Examples in ``split``."""
  return len(load(data).split(split)[1])


def class_counts(data: ml_collections.ConfigDict, split: str, num_classes: int) -> np.ndarray:
  """Examples per class in ``split`` (multi-label: examples tagged with each class)."""
  labels = load(data).split(split)[1]
  if labels.ndim == 2:
    return labels.astype(np.int64).sum(axis=0)[:num_classes]
  return np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.int64)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The positions of epoch ``epoch``: a permutation of ``0..n-1`` keyed by ``(seed, epoch)``."""
  return np.random.default_rng([int(seed) % 2**63, int(epoch)]).permutation(n).astype(np.int32)


def order(seed: int, n: int) -> Callable[[int], np.ndarray]:
  """``epoch -> epoch_order(seed, epoch, n)``."""
  return functools.partial(epoch_order, seed, n=n)


def train_split(data: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the training split."""
  check(data)
  return load(data).split(data.train_split, 'data.train_split')


def examples_per_process(data: ml_collections.ConfigDict, split: str, process_count: int) -> int:
  """Training examples per process and epoch (every process sees its rows of each global batch)."""
  return split_size(data, split) // process_count


def train_batches(data: ml_collections.ConfigDict, indices: Callable[[int, int], np.ndarray], *,
                  local_batch_size: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """The endless host stream from ``start_step``: this process's rows of each global batch
  (``indices(first_position, count)`` gives split indices of stream positions)."""
  images, labels = train_split(data)
  global_batch = local_batch_size * process_count
  if len(labels) < global_batch:
    raise UserError(f'The training split has {len(labels)} examples, fewer than the global batch '
                    f'of {global_batch}; lower config.batch_size.')
  step = start_step
  while True:
    idx = indices(step * global_batch + process_index * local_batch_size, local_batch_size)
    yield {'image': images[idx], 'label': labels[idx]}
    step += 1


class EvalData:
  """``pipeline.EvalData`` for an arrays split: this process's even share of the split in
  batches of exactly ``local_batch_size`` with a boolean ``mask``, padded to ``num_batches``."""

  def __init__(self, data: ml_collections.ConfigDict, split: str, *, local_batch_size: int,
               process_index: int = 0, process_count: int = 1, **unused: Any):
    check(data)
    images, labels = load(data).split(split)
    n = len(labels)
    lo, hi = process_index * n // process_count, (process_index + 1) * n // process_count
    self.split, self.local_batch_size = split, local_batch_size
    self._images, self._labels = images[lo:hi], labels[lo:hi]
    self.num_batches = math.ceil(math.ceil(n / process_count) / local_batch_size)
    self.examples_read = 0   # (batches() counts them)

  def batches(self) -> Iterator[Batch]:
    """As ``pipeline.EvalData.batches`` (``examples_read`` too)."""
    b = self.local_batch_size
    self.examples_read = 0
    for i in range(self.num_batches):
      image, label = self._images[i * b:(i + 1) * b], self._labels[i * b:(i + 1) * b]
      real = len(label)
      self.examples_read += real
      if real < b:
        image = np.concatenate([image, np.zeros((b - real,) + image.shape[1:], image.dtype)])
        label = np.concatenate([label, np.zeros((b - real,) + label.shape[1:], label.dtype)])
      yield {'image': image, 'label': label, 'mask': np.arange(b) < real}

  def head_batches(self, num_batches: int) -> Iterator[Batch]:
    """The first ``num_batches`` of ``batches()``."""
    for i, batch in enumerate(self.batches()):
      if i >= num_batches:
        return
      yield batch


def samples(data: ml_collections.ConfigDict, eval_count: int, train_count: int
            ) -> dict[str, np.ndarray]:
  """``pipeline.samples`` for arrays: the first images and labels of the eval and train splits."""
  check(data)
  f = load(data)
  out = {}
  for name, split, n in (('eval', data.eval_split, eval_count),
                         ('train', data.train_split, train_count)):
    images, labels = f.split(split)
    out[f'{name}_images'] = np.array(images[:n])
    out[f'{name}_labels'] = np.array(labels[:n]).astype(np.int32)
  return out
