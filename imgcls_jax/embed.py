"""``--mode=embed``: features of a split, a folder or files, a k-NN evaluation and a 2-D map.

  python -m imgcls_jax.main --mode=embed --workdir=RUN [--config.embed.split=test]
  python -m imgcls_jax.main --mode=embed --config=configs/fashion_mnist_classical.py \\
      --config.embed.extractor=classical --workdir=OUT

``config.embed.extractor='model'`` embeds with the penultimate layer (the head's input,
``explain.penultimate``) of the trained run in ``--workdir``, on images prepared as evaluation
prepares them; ``'classical'`` with the scikit-image features of ``config.classical``
(``features.py``) of the images of ``config.data`` (on the command line with a trained run's
``--workdir`` and no ``--config``, the run's own data; on a classical fit's ``--workdir``, the fit's
data and features, read as ``--mode=evaluate`` reads them; never augmented: no
``train_preprocess``). What is embedded: ``config.embed.inputs``
(files and folders, unlabelled), else the split ``config.embed.split`` of the dataset (a tfds
dataset or an image folder; labels from it). Writes to ``config.embed.output_dir`` (default
``<workdir>/embed_<split>``, ``embed_<split>_classical`` for the classical extractor), each file
under a temporary name renamed once everything is computed:

* ``embeddings.npz``: ``features`` (N x D float32), ``labels`` (N, -1 = unknown; a tagging run's
  are multi-hot N x T rows, all -1 = unknown), ``multilabel``, ``paths`` (file paths;
  ``name:split[i]`` for tfds examples), ``class_names``; also ``embeddings.parquet`` when pyarrow
  is installed (a tagging run's ``label`` column holds lists: the multi-hot row);
* with labels and ``config.embed.reference_split`` != 'none': a k-NN classifier (scikit-learn,
  distance-weighted, ``knn_k`` neighbours, ``knn_metric``) fitted on the reference split's
  embeddings predicts the embedded split (a ``knn_k`` above the reference's size uses all of it,
  with a warning: the report's ``k`` is the number used, ``k_requested`` the key's); its full
  evaluation report goes to ``knn/`` (the report files of ``--mode=evaluate``; a rerun without a
  k-NN removes an earlier one), its headline to ``embed_report.md`` / ``.json``. Tags: each tag is predicted when at least half of the k nearest
  reference examples carry it (``embed_knn.py``), reported as F1 micro / macro and exact match;
* ``projection.png``: PCA to 2-D, and t-SNE of up to ``tsne_max`` points, coloured by class
  (tags: by each example's first tag).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import atomic, explain, features, inference, metrics, report_files, run_directory
from imgcls_jax.data import arrays, images, reader
from imgcls_jax.embed_knn import knn_evaluate, knn_metrics, knn_tag_votes, projection_png
from imgcls_jax.errors import UserError

__all__ = ['EXTRACTORS', 'Extractor', 'embed', 'knn_evaluate', 'knn_metrics', 'knn_tag_votes',
           'projection_png']

EXTRACTORS = ('model', 'classical')


# What --workdir holds: (its words, in an error; its short name)
_HOLDS = {'run': ('a run trained on', 'trained run', 'run'),
          'fit': ('a classical baseline fitted on', 'classical fit', 'fit')}


def _refuse_other_data(config: ml_collections.ConfigDict, workdir: str, saved: dict[str, Any],
                       flags: dict[str, Any], kind: str) -> None:
  """A UserError when ``--config`` or ``--config.data.name`` (``flags``: the data keys given)
  names other data than ``saved``, the data of the run or fit (``kind``) in ``workdir``."""
  run_name, name = str(saved.get('name')), str(flags.get('data.name', config.data.name))
  arrays_moved = all(n.startswith(arrays.PREFIX) for n in (run_name, name))  # a location
  if 'data.name' not in flags and name != run_name:   # --config's data, or the schema's default
    from imgcls_jax import configlib
    chosen = name != configlib.load_config_file(configlib.default_config_path()).data.name
  else:
    chosen = name != run_name and not arrays_moved
  if chosen:
    given, drop = (('--config.data.name', 'that flag') if 'data.name' in flags
                   else ("the --config's data", '--config'))
    holds, long, short = _HOLDS[kind]
    raise UserError(f"--workdir={workdir} holds {holds} '{run_name}', not on {given} '{name}': on "
                    f"a {long} the classical extractor embeds the {short}'s data; drop {drop}, or "
                    f'give a --workdir without a {short}.')


def classical_data(config: ml_collections.ConfigDict, workdir: str,
                   overrides: dict[str, Any] | None) -> ml_collections.ConfigDict:
  """The data the classical extractor embeds: ``config.data``; but from the command line
  (``overrides`` given) on a trained run's ``workdir``, the run's own data with the data keys given
  as flags (as the model extractor reads it), and a ``--config`` naming other data is refused."""
  saved = (run_directory.read_config(workdir) or {}).get('data') if overrides is not None else None
  if not saved:   # an output folder, or a call from Python: the config's data
    return config.data
  flags = {k: v for k, v in overrides.items() if k.startswith('data.')}
  _refuse_other_data(config, workdir, saved, flags, 'run')
  data = inference.effective_config({'data': saved}, None, flags).data
  logging.info("Classical features of the run's own data ('%s', from %s).", data.name,
               os.path.join(workdir, 'config.json'))
  return data


def classical_fit_settings(config: ml_collections.ConfigDict, workdir: str,
                           overrides: dict[str, Any] | None
                           ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(data, ``config.classical``) of the classical fit in ``workdir`` (its ``classical.json``),
  as ``--mode=evaluate`` reads it (``classical_model.run_config``: the data keys given as flags
  that move or replace its images apply). Its features are the fit's: a ``--config.classical``
  flag that changes them is refused, a ``--config`` whose features differ gets a warning."""
  from imgcls_jax import classical_model, configlib
  meta = classical_model.read_meta(workdir)
  flags = {k: v for k, v in (overrides or {}).items() if not k.startswith('classical.')}
  _refuse_other_data(config, workdir, meta['config'].get('data') or {},
                     {k: v for k, v in flags.items() if k.startswith('data.')}, 'fit')
  run = classical_model.run_config(meta, flags, workdir)
  spec, source = classical_model.spec_of(run), os.path.join(workdir, classical_model.META_FILE)
  for key, value in sorted((overrides or {}).items()):
    if not key.startswith('classical.'):
      continue
    leaf, trial = key.split('.', 1)[1], ml_collections.ConfigDict(run.classical.to_dict())
    trial[leaf] = value
    if features.spec_from_config(trial) != spec:
      raise UserError(f'--config.{key}={value} would change the features of the classical fit '
                      f'in --workdir (its {key}={run.classical.get(leaf)!r}, in {source}), which '
                      'the classical extractor embeds with; drop that flag, or give a --workdir '
                      'without a fit.')
    with run.classical.unlocked():   # (the threads, or the classifier: not the features)
      run.classical[leaf] = value
  schema = configlib.load_config_file(configlib.default_config_path()).classical
  theirs = features.spec_from_config(config.classical)
  if theirs != spec and (overrides is None or theirs != features.spec_from_config(schema)):
    differ = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) !=
              getattr(theirs, f.name)]
    logging.warning("The config's classical features (%s) are not those of the classical fit in "
                    '%s (%s): embedding with the fit\'s; give a --workdir without a fit for '
                    'other features.', ', '.join(f'{k}={getattr(theirs, k)}' for k in differ),
                    workdir, ', '.join(f'{k}={getattr(spec, k)}' for k in differ))
  logging.info("Classical features of the fit's data ('%s') with its config.classical, from %s.",
               run.data.name, source)
  return run.data, run.classical


class Extractor:
  """Images -> features, and how to read the images it takes."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               overrides: dict[str, Any] | None):
    self.kind = config.embed.extractor
    if self.kind not in EXTRACTORS:
      raise UserError(f"config.embed.extractor='{self.kind}' must be one of "
                      f"{', '.join(EXTRACTORS)}.")
    self.batch_size = int(config.embed.batch_size)
    if self.kind == 'model':
      mine = ('embed.', 'classical.')  # this mode's keys are no part of the trained run
      kept = {k: v for k, v in (overrides or {}).items() if not k.startswith(mine)}
      self.clf = inference.classifier(inference.load(workdir, config, overrides=kept),
                                      max_batch=self.batch_size)
      self.step = self.clf.trained.step   # the latest: the weights predict, serve, export use
      self.data = self.clf.run.data
      self.info = self.clf.trained.info
      self.class_names = list(self.clf.class_names)
      self._fn = jax.jit(lambda v, x: explain.penultimate(v, x, model_def=self.clf.model_def,
                                                          cfg=self.clf.step_cfg))
    else:
      from imgcls_jax import classical_model
      self.step = None
      kind = run_directory.kind(workdir)
      if kind == 'classical_cv':   # one fit per fold: which one's features is the user's choice
        raise UserError(f'--workdir={workdir} holds a classical cross-validation (a fit per '
                        'fold); embed with one fit\'s data and features: --workdir='
                        f"{os.path.join(workdir, 'fold_0')} (or another fold).")
      if kind == 'classical':   # a fit: its data and its features
        data, classical = classical_fit_settings(config, workdir, overrides)
      else:
        data, classical = classical_data(config, workdir, overrides), config.classical
      self.data = classical_model.unaugmented(data)   # as --mode=classical reads it
      self.info = reader.describe(self.data)
      self.class_names = list(self.info.class_names)
      self.spec = features.spec_from_config(classical)
      self.workers = int(classical.get('workers', 0))

  def __call__(self, images_NxHxWxC: np.ndarray) -> np.ndarray:
    if self.kind == 'classical':
      return features.extract(images_NxHxWxC, self.spec, workers=self.workers)
    out = []
    for start in range(0, len(images_NxHxWxC), self.batch_size):
      chunk = images_NxHxWxC[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(jax.device_get(self._fn(self.clf.variables, padded)))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def read_file(self, path: str) -> np.ndarray:
    """One image file as the extractor takes it (raises ``images.UnreadableImage``)."""
    if self.kind == 'model':
      return self.clf.prepare(path)
    h, w, c = self.info.image_shape
    return images.decode(path, channels=c, size_hw=(h, w) if h and w else None)


def split_paths(data: ml_collections.ConfigDict, split: str, positions: np.ndarray,
                class_names: list[str]) -> list[str]:
  """Names of the examples at ``positions`` of a split's reading order: the file paths of an
  image folder, else ``name:split[i]``."""
  from imgcls_jax.data import folder_index, folder_layout, image_folder
  if image_folder.is_folder(data) and '@' not in split:
    indexed = folder_index.index(folder_layout.source_of(data), split, tuple(class_names))
    return [indexed.paths[i] for i in positions]
  return [f'{data.name}:{split}[{i}]' for i in positions]


def embed_files(extractor: Extractor, spec: str) -> tuple[np.ndarray, list[str]]:
  """(features, paths) of the readable files named in ``spec``; unreadable ones are skipped."""
  files = images.list_inputs(spec, 'embed.inputs')
  arrays, paths, skipped = [], [], []
  for path in files:
    try:
      arrays.append(extractor.read_file(path))
      paths.append(path)
    except images.UnreadableImage as e:
      skipped.append((path, str(e)))
  if not arrays:   # one line, not a warning per file before it
    raise UserError(f'None of the {len(files)} input file(s) in config.embed.inputs is a readable '
                    f'image ({images.unreadable_summary(skipped)}); give image files or folders.')
  for path, why in skipped:
    logging.warning('Skipped %s: %s.', path, why)
  return extractor(np.stack(arrays)), paths


def _replace_all(staged: list[tuple[str, str]]) -> None:
  """Renames each (temporary, final) path pair: the last step, after everything is computed."""
  for tmp, final in staged:
    os.replace(tmp, final)


def _stage_arrays(staged: list[tuple[str, str]], out_dir: str, feats: np.ndarray,
                  labels: np.ndarray, paths: list[str], class_names: list[str]) -> None:
  """Writes embeddings.npz (and .parquet with pyarrow) under temporary names, each (temporary,
  final) pair added to ``staged`` before it is written. Multi-hot labels (N x T) are stored as
  they are, a list column in the parquet."""
  final = os.path.join(out_dir, 'embeddings.npz')
  staged.append((atomic.temporary_path(final), final))
  np.savez_compressed(staged[-1][0], features=feats.astype(np.float32),
                      labels=labels.astype(np.int64), multilabel=np.asarray(labels.ndim == 2),
                      paths=np.array(paths, dtype=str),
                      class_names=np.array(class_names, dtype=str))
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    return
  label = (pa.array(list(labels.astype(np.int64)), type=pa.list_(pa.int64())) if labels.ndim == 2
           else labels.astype(np.int64))
  table = pa.table({'path': paths, 'label': label,
                    'features': list(feats.astype(np.float32))})
  final = os.path.join(out_dir, 'embeddings.parquet')
  staged.append((atomic.temporary_path(final), final))
  pq.write_table(table, staged[-1][0])


def check_options(e: ml_collections.ConfigDict) -> None:
  """Raises UserError for a ``config.embed`` value that cannot work, before any work is done."""
  if int(e.batch_size) < 1:
    raise UserError(f'config.embed.batch_size={e.batch_size} must be a positive number of images '
                    'per forward pass (e.g. 256).')
  if int(e.knn_k) < 1:
    raise UserError(f'config.embed.knn_k={e.knn_k} must be at least 1.')
  if int(e.get('tsne_max', 0)) < 0:
    raise UserError(f'config.embed.tsne_max={e.tsne_max} must be >= 0 (the most points the t-SNE '
                    'panel shows; 0 = PCA only).')
  if e.knn_metric not in knn_metrics():
    raise UserError(f"config.embed.knn_metric={e.knn_metric!r} is not a k-NN metric; use one of "
                    f"{', '.join(knn_metrics())}.")


def embed(config: ml_collections.ConfigDict, workdir: str,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``embed`` mode; returns the summary written to ``embed_report.json``."""
  from imgcls_jax import embed_knn
  e = config.embed
  check_options(e)
  t0 = time.perf_counter()
  extractor = Extractor(config, workdir, overrides)
  data, names = extractor.data, extractor.class_names
  tags = bool(extractor.info.multilabel)
  if e.inputs:
    feats, paths = embed_files(extractor, e.inputs)
    labels = np.full((len(paths), len(names)) if tags else len(paths), -1, np.int64)
    what = 'inputs'
  else:
    what = e.split or data.eval_split
    x, labels, positions = features.split_arrays(data, what, info=extractor.info)
    feats, paths = extractor(x), split_paths(data, what, positions, names)
  name = 'inputs' if e.inputs else what.split('@')[0].replace('/', '_')
  suffix = '_classical' if extractor.kind == 'classical' else ''  # beside the model's, not over
  out_dir = os.path.abspath(e.output_dir or os.path.join(workdir, f'embed_{name}{suffix}'))
  summary: dict[str, Any] = {'extractor': extractor.kind, 'embedded': what,
                             'num_examples': len(feats), 'dims': int(feats.shape[1]),
                             'task': 'multilabel' if tags else 'single-label',
                             'class_names': names}
  if extractor.step is not None:
    summary['checkpoint_step'] = extractor.step
  ref = e.reference_split or data.train_split
  shared = (reader.shared_examples(data, what, ref, extractor.info)
            if ref != 'none' and not e.inputs else None)
  if shared:   # each example would be its own nearest neighbour: a k-NN score of ~100%
    logging.warning("No k-NN evaluation: the embedded split '%s' shares %d examples with the "
                    "reference split '%s', and each would find itself; set "
                    "--config.embed.reference_split to a split without them (e.g. 'train' for "
                    "--config.embed.split=test), or 'none'.", what, shared, ref)
    ref = 'none'
  rep = None
  if ref != 'none' and np.all(labels >= 0):
    x_ref, y_ref, _ = features.split_arrays(data, ref, info=extractor.info)
    k = min(int(e.knn_k), len(y_ref))   # more neighbours than the reference has: all of them
    if k < int(e.knn_k):
      logging.warning("config.embed.knn_k=%d is more than the %d examples of the reference split "
                      "'%s': the k-NN uses all %d (recorded as k=%d); set --config.embed.knn_k to "
                      "at most %d.", int(e.knn_k), len(y_ref), ref, k, k, k)
    rep = embed_knn.knn_report(extractor(x_ref), y_ref, feats, labels, names, k=k,
                               metric=e.knn_metric,
                               calibration_bins=config.evaluate.calibration_bins)
    vote = 'tag vote' if tags else ''
    rep['context'] = {'dataset': data.name, 'split': what,
                      'checkpoint_step': extractor.step or 0,
                      'checkpoint': (f'{extractor.kind} embeddings' if extractor.step is None else
                                     'latest (the weights predict, serve and export use)'),
                      'tta': 'none',
                      'model': f"{k}-NN {vote + ' ' if vote else ''}({e.knn_metric}) on "
                               f"{extractor.kind} features, reference '{ref}' "
                               f"({len(y_ref)} examples)"}
    summary['knn'] = {'k': k, 'k_requested': int(e.knn_k), 'metric': e.knn_metric,
                      'reference_split': ref, 'reference_examples': len(y_ref),
                      **embed_knn.headline(rep),
                      'report': os.path.join(out_dir, 'knn', 'report.md')}
  os.makedirs(out_dir, exist_ok=True)
  staged = [(os.path.join(out_dir, 'projection.tmp.png'), os.path.join(out_dir, 'projection.png'))]
  try:   # every file under a temporary name first: nothing half-written if a step fails
    summary['projection'] = projection_png(
        feats, labels, names, staged[0][0], tsne_max=int(e.tsne_max),
        title=f"{extractor.kind} features ({feats.shape[1]}-d) of {data.name} '{what}'")
    _stage_arrays(staged, out_dir, feats, labels, paths, names)
    summary['files'] = [final for _, final in staged[1:]]
    summary['wall_time_s'] = time.perf_counter() - t0
    for final, text in (('embed_report.json', json.dumps(metrics.json_safe(summary), indent=1)),
                        ('embed_report.md', _markdown(summary))):
      path = os.path.join(out_dir, final)
      staged.append((atomic.temporary_path(path), path))
      with open(staged[-1][0], 'w') as f:
        f.write(text)
    if rep is not None:
      report_files.write(rep, os.path.join(out_dir, 'knn'),
                         f"k-NN on {extractor.kind} embeddings: {data.name} '{what}'", None)
    _replace_all(staged)
    if rep is None and report_files.remove(os.path.join(out_dir, 'knn')):
      logging.info('Removed %s: an earlier k-NN report, and this embedding has none.',
                   os.path.join(out_dir, 'knn'))
  finally:
    for tmp, _ in staged:
      if os.path.exists(tmp):
        os.remove(tmp)
  print(_markdown(summary).strip() + f'\nOutput: {out_dir}', flush=True)
  return summary


def _markdown(s: dict[str, Any]) -> str:
  lines = [f"# Embeddings: {s['extractor']} features of {s['embedded']}", '',
           f"- {s['num_examples']} examples x {s['dims']} dimensions: " + ', '.join(
               os.path.basename(f) for f in s['files'])]
  if s.get('checkpoint_step') is not None:
    lines.append(f"- the run's checkpoint {s['checkpoint_step']} (its latest: the weights "
                 'predict, serve and export use)')
  if s.get('task') == 'multilabel':
    lines.append(f"- labels: multi-hot rows over {len(s['class_names'])} tags (a tagging run)")
  if 'knn' in s:
    k = s['knn']
    asked = (f", knn_k={k['k_requested']} capped at the reference's size"
             if k.get('k_requested', k['k']) != k['k'] else '')
    where = (f"{k['metric']}, reference '{k['reference_split']}', {k['reference_examples']} "
             f"examples{asked}")
    if k.get('task') == 'multilabel':
      lines.append(f"- {k['k']}-NN tag vote ({where}; a tag is predicted when at least half of "
                   f"the neighbours carry it), metrics for tags: F1 micro {k['f1_micro']:.4f}, "
                   f"F1 macro {k['f1_macro']:.4f}, exact match {100 * k['exact_match']:.2f}%, "
                   f"mAP {'-' if k['map'] is None else format(k['map'], '.4f')} "
                   '(report: knn/report.md)')
    else:
      lines.append(f"- {k['k']}-NN ({where}): top-1 {100 * k['accuracy']:.2f}%, "
                   f"macro F1 {k['f1_macro']:.4f} (report: knn/report.md)")
  p = s['projection']
  lines.append(f"- projection.png: PCA of {p['pca_points']} points"
               + (f", t-SNE of {p['tsne_points']}" if p['tsne_points'] else '')
               + (f", coloured by the {p['coloured_by']}" if 'coloured_by' in p else ''))
  return '\n'.join(lines) + '\n'
