"""Writes a dataset's splits as one arrays file (``data/arrays.py``), to train where TensorFlow is
not installed: ``--config.data.name=arrays:/path/to/file.npz``.

Command (where TensorFlow is installed; reads the dataset as evaluation does, after
``--data.eval_preprocess`` when given, so every image has the size the model reads):
  python -m imgcls_jax.data.write_arrays --dataset=fashion_mnist --output=/tmp/fmnist.npz \\
      [--splits=train,test] [--data_dir=DIR] [--eval_preprocess=''] [--compress]
  python -m imgcls_jax.data.write_arrays --folder=ROOT --holdout_fraction=0.2 \\
      --eval_preprocess='resize(size=64)' --output=/tmp/mine.npz
  python -m imgcls_jax.data.write_arrays --manifest=tags.csv --multilabel --output=/tmp/tags.npz
Fashion-MNIST: 60,000 + 10,000 images, 55 MB (29 MB with --compress, slower to load).
"""
from __future__ import annotations

import os
import sys

import ml_collections
import numpy as np

from imgcls_jax.data import arrays_save
from imgcls_jax.data.info import flips_allowed
from imgcls_jax.errors import UserError


def split_name(split: str) -> str:
  """The arrays-file name of a tfds split spec ('train[:80%]' -> 'train__80')."""
  safe = ''.join(ch if ch.isalnum() else '_' for ch in split).strip('_')
  return safe or 'split'


def write(data: ml_collections.ConfigDict, splits: list[str], output: str,
          compress: bool = False) -> dict[str, int]:
  """Reads every example of ``splits`` of ``data`` (eval-preprocessed) and writes them to
  ``output``; returns examples per split name."""
  from imgcls_jax.data import pipeline, sources
  info = sources.describe(data)
  if info.image_shape[0] is None or info.image_shape[1] is None:
    if not data.eval_preprocess:
      raise UserError(f"Images of '{info.name}' differ in size; give --eval_preprocess that fixes "
                      "it (e.g. 'resize(size=224)').")
  contents: dict[str, np.ndarray] = {}
  sizes = {}
  for split in splits:
    name = split_name(split)
    images, labels = [], []
    for batch in pipeline.EvalData(data, split, local_batch_size=1024, info=info).batches():
      images.append(batch['image'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
    contents[f'{name}_images'] = np.concatenate(images).astype(np.uint8)
    contents[f'{name}_labels'] = np.concatenate(labels)
    sizes[name] = len(contents[f'{name}_labels'])
  contents['class_names'] = np.asarray(info.class_names, dtype=str)
  contents['mirror_safe'] = np.asarray(info.mirror_safe and flips_allowed(data))
  # How the pixels were made from the decoded files: predict and serve apply the same ops to a
  # raw image (inference.prepare), so that serving pixels equal training pixels.
  contents['preprocess'] = np.asarray(data.eval_preprocess or '')
  arrays_save.save(contents, output, compress)
  return sizes


def write_tfds(data: ml_collections.ConfigDict, name: str, output: str) -> dict[str, int]:
  """Every split of tfds dataset ``name`` (with ``data``'s data_dir / manual_dir) written to
  ``output``, as stored (no preprocessing): what ``'arrays:NAME'`` reads."""
  import logging
  from imgcls_jax.data import sources
  c = ml_collections.ConfigDict(data.to_dict())
  c.name, c.eval_preprocess, c.cache = name, '', False
  c.train_preprocess = ''
  splits = sorted(sources.builder(c).info.splits.keys())
  if not splits:
    raise UserError(f"tfds dataset '{name}' lists no splits; write its arrays file with "
                    'python -m imgcls_jax.data.write_arrays --splits=...')
  c.train_split, c.eval_split = splits[0], splits[-1]
  logging.info("Writing tfds '%s' (splits %s) as arrays to %s, once.", name, ', '.join(splits),
               output)
  return write(c, splits, output)


def main(argv: list[str]) -> int:
  from absl import flags
  fv = flags.FlagValues()
  dataset = flags.DEFINE_string('dataset', None, 'tfds name (or use --folder / --manifest).',
                                flag_values=fv)
  folder = flags.DEFINE_string('folder', None, 'An image folder (ROOT/<class>/* or '
                               'ROOT/<split>/<class>/*) instead of a tfds dataset.', flag_values=fv)
  manifest = flags.DEFINE_string('manifest', None, 'A CSV manifest of path,label[,split] rows '
                                 'instead of a tfds dataset.', flag_values=fv)
  holdout = flags.DEFINE_float('holdout_fraction', 0.0, 'Image folders without split folders: '
                               "the held-out share (split 'test' then holds it).", flag_values=fv)
  output = flags.DEFINE_string('output', None, 'The .npz file to write.', flag_values=fv)
  splits = flags.DEFINE_list('splits', ['train', 'test'], 'Splits to write.', flag_values=fv)
  data_dir = flags.DEFINE_string('data_dir', None, 'tfds data_dir.', flag_values=fv)
  eval_pp = flags.DEFINE_string('eval_preprocess', '', 'Preprocessing applied before writing.',
                                flag_values=fv)
  compress = flags.DEFINE_bool('compress', False, 'np.savez_compressed (smaller, slower to load).',
                               flag_values=fv)
  tags = flags.DEFINE_bool('multilabel', False, "A manifest of tags ('a;b' labels): 0/1 rows.",
                           flag_values=fv)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(f"{(__doc__ or '').strip()}\n\nFlags:\n{fv.get_help(prefix='  ')}")
    return 0
  try:
    fv(argv)
    if bool(dataset.value) + bool(folder.value) + bool(manifest.value) != 1 or not output.value:
      raise UserError('Give one of --dataset (e.g. fashion_mnist), --folder or --manifest, and '
                      '--output (a .npz path).')
    if not output.value.endswith('.npz'):
      raise UserError(f'--output={output.value} must end in .npz.')
    from configs import default
    from imgcls_jax.data import image_folder
    c = default.get_config()
    c.data.name = dataset.value or image_folder.NAME
    c.data.folder, c.data.manifest = folder.value or '', manifest.value or ''
    c.data.holdout_fraction = holdout.value
    c.data.multilabel = tags.value
    c.data.data_dir = data_dir.value
    c.data.eval_preprocess = eval_pp.value
    c.data.train_split, c.data.eval_split = splits.value[0], splits.value[-1]
    c.data.cache = False
    sizes = write(c.data, list(splits.value), output.value, compress.value)
  except (UserError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  listed = ', '.join(f'{k} {v}' for k, v in sizes.items())
  print(f'wrote {output.value} ({listed}); train with '
        f'--config.data.name=arrays:{os.path.abspath(output.value)}')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.exit(main(sys.argv))
