"""``--mode=embed``: features of a split, a folder or files, a k-NN evaluation and a 2-D map.

  python -m imgcls_jax.main --mode=embed --workdir=RUN [--config.embed.split=test]
  python -m imgcls_jax.main --mode=embed --config=configs/fashion_mnist_classical.py \\
      --config.embed.extractor=classical --workdir=OUT

``config.embed.extractor='model'`` embeds with the penultimate layer (the head's input,
``explain.penultimate``) of the trained run in ``--workdir``, on images prepared as evaluation
prepares them; ``'classical'`` with the scikit-image features of ``config.classical``
(``features.py``) of the images of ``config.data``. What is embedded: ``config.embed.inputs``
(files and folders, unlabelled), else the split ``config.embed.split`` of the dataset (a tfds
dataset or an image folder; labels from it). Writes to ``config.embed.output_dir``:

* ``embeddings.npz``: ``features`` (N x D float32), ``labels`` (N, -1 = unknown), ``paths``
  (file paths; ``name:split[i]`` for tfds examples), ``class_names``; also
  ``embeddings.parquet`` when pyarrow is installed;
* with labels and ``config.embed.reference_split`` != 'none': a k-NN classifier (scikit-learn,
  distance-weighted, ``knn_k`` neighbours, ``knn_metric``) fitted on the reference split's
  embeddings predicts the embedded split (a ``knn_k`` above the reference's size uses all of it,
  with a warning: the report's ``k`` is the number used, ``k_requested`` the key's); its full
  evaluation report goes to ``knn/`` (the report files of ``--mode=evaluate``), its headline to
  ``embed_report.md`` / ``.json``;
* ``projection.png``: PCA to 2-D, and t-SNE of up to ``tsne_max`` points, coloured by class.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import explain, features, inference, metrics, report_files
from imgcls_jax.data import images, reader
from imgcls_jax.errors import UserError

EXTRACTORS = ('model', 'classical')


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
      self.data = self.clf.run.data
      self.info = self.clf.trained.info
      self.class_names = list(self.clf.class_names)
      self._fn = jax.jit(lambda v, x: explain.penultimate(v, x, model_def=self.clf.model_def,
                                                          cfg=self.clf.step_cfg))
    else:
      from imgcls_jax.data import reader
      self.data = config.data
      self.info = reader.describe(config.data)
      self.class_names = list(self.info.class_names)
      self.spec = features.spec_from_config(config.classical)
      self.workers = int(config.classical.workers)

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


def knn_evaluate(ref_features: np.ndarray, ref_labels: np.ndarray, features_NxD: np.ndarray,
                 *, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(``N x K'`` class probabilities, the K' classes of the reference set) of a distance-weighted
  k-NN fitted on the reference set."""
  from sklearn.neighbors import KNeighborsClassifier
  if k < 1:
    raise UserError(f'config.embed.knn_k={k} must be at least 1.')
  knn = KNeighborsClassifier(n_neighbors=min(k, len(ref_labels)), weights='distance',
                             metric=metric, algorithm='brute')
  knn.fit(ref_features, ref_labels)
  return knn.predict_proba(features_NxD), knn.classes_


def projection_png(features_NxD: np.ndarray, labels_N: np.ndarray, class_names: list[str],
                   path: str, *, tsne_max: int, title: str, seed: int = 0) -> dict[str, Any]:
  """PCA (and t-SNE of up to ``tsne_max`` points) scatter plots coloured by class; returns what
  was drawn."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE
  n = len(features_NxD)
  panels = [('PCA', PCA(2, random_state=seed).fit_transform(features_NxD),
             np.arange(n))] if n >= 2 else []
  drawn = {'pca_points': n if panels else 0, 'tsne_points': 0}
  if tsne_max and n >= 10:
    idx = np.sort(np.random.RandomState(seed).permutation(n)[:tsne_max])
    perplexity = float(min(30, (len(idx) - 1) / 3))
    xy = TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(
        features_NxD[idx])
    panels.append((f't-SNE ({len(idx)} of {n})' if len(idx) < n else 't-SNE', xy, idx))
    drawn['tsne_points'] = len(idx)
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(7 * max(1, len(panels)), 6.5),
                           squeeze=False)
  cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
  for ax, (name, xy, idx) in zip(axes[0], panels):
    lab = labels_N[idx]
    if np.any(lab < 0):
      ax.scatter(xy[lab < 0, 0], xy[lab < 0, 1], s=6, c='grey', label='unlabelled')
    for c, cname in enumerate(class_names):
      sel = lab == c
      if sel.any():
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=cname, alpha=0.7)
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][-1].legend(loc='center left', bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return drawn


def _write_arrays(out_dir: str, feats: np.ndarray, labels: np.ndarray, paths: list[str],
                  class_names: list[str]) -> list[str]:
  written = [os.path.join(out_dir, 'embeddings.npz')]
  np.savez_compressed(written[0], features=feats.astype(np.float32),
                      labels=labels.astype(np.int64), paths=np.array(paths, dtype=str),
                      class_names=np.array(class_names, dtype=str))
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    return written
  table = pa.table({'path': paths, 'label': labels.astype(np.int64),
                    'features': list(feats.astype(np.float32))})
  written.append(os.path.join(out_dir, 'embeddings.parquet'))
  pq.write_table(table, written[-1])
  return written


def knn_metrics() -> list[str]:
  """The metrics the k-NN evaluation takes: scikit-learn's for brute-force neighbours, less
  'precomputed' (distances, not features), 'haversine' (2-D points only) and those that need
  parameters no config key gives ('mahalanobis', 'seuclidean')."""
  from sklearn.neighbors import VALID_METRICS
  unusable = {'precomputed', 'haversine', 'mahalanobis', 'seuclidean'}
  return sorted(set(VALID_METRICS['brute']) - unusable)


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
  e = config.embed
  check_options(e)
  t0 = time.perf_counter()
  extractor = Extractor(config, workdir, overrides)
  data, names = extractor.data, extractor.class_names
  if e.inputs:
    feats, paths = embed_files(extractor, e.inputs)
    labels, what = np.full(len(paths), -1, np.int64), 'inputs'
  else:
    what = e.split or data.eval_split
    x, labels, positions = features.split_arrays(data, what, info=extractor.info)
    feats, paths = extractor(x), split_paths(data, what, positions, names)
  name = 'inputs' if e.inputs else what.split('@')[0].replace('/', '_')
  out_dir = os.path.abspath(e.output_dir or os.path.join(workdir, f'embed_{name}'))
  os.makedirs(out_dir, exist_ok=True)
  summary: dict[str, Any] = {'extractor': extractor.kind, 'embedded': what,
                             'num_examples': len(feats), 'dims': int(feats.shape[1]),
                             'class_names': names,
                             'files': _write_arrays(out_dir, feats, labels, paths, names)}
  ref = e.reference_split or data.train_split
  shared = (reader.shared_examples(data, what, ref, extractor.info)
            if ref != 'none' and not e.inputs else None)
  if shared:   # each example would be its own nearest neighbour: a k-NN score of ~100%
    logging.warning("No k-NN evaluation: the embedded split '%s' shares %d examples with the "
                    "reference split '%s', and each would find itself; set "
                    "--config.embed.reference_split to a split without them (e.g. 'train' for "
                    "--config.embed.split=test), or 'none'.", what, shared, ref)
    ref = 'none'
  if ref != 'none' and np.all(labels >= 0):
    x_ref, y_ref, _ = features.split_arrays(data, ref, info=extractor.info)
    k = min(int(e.knn_k), len(y_ref))   # more neighbours than the reference has: all of them
    if k < int(e.knn_k):
      logging.warning("config.embed.knn_k=%d is more than the %d examples of the reference split "
                      "'%s': the k-NN uses all %d (recorded as k=%d); set --config.embed.knn_k to "
                      "at most %d.", int(e.knn_k), len(y_ref), ref, k, k, k)
    probs, classes = knn_evaluate(extractor(x_ref), y_ref, feats, k=k, metric=e.knn_metric)
    scores = np.full((len(feats), len(names)), -1e9, np.float32)
    scores[:, classes] = np.log(np.maximum(probs, 1e-12))
    from imgcls_jax import report as report_lib
    rep = report_lib.summarize(report_lib.sums_of_scores(
        scores, labels, config.evaluate.calibration_bins), names)
    rep['context'] = {'dataset': data.name, 'split': what, 'checkpoint_step': 0,
                      'checkpoint': f'{extractor.kind} embeddings', 'tta': 'none',
                      'model': f"{k}-NN ({e.knn_metric}) on {extractor.kind} features, "
                               f"reference '{ref}' ({len(y_ref)} examples)"}
    knn_dir = os.path.join(out_dir, 'knn')
    title = f"k-NN on {extractor.kind} embeddings: {data.name} '{what}'"
    report_files.write(rep, knn_dir, title, None)
    summary['knn'] = {'k': k, 'k_requested': int(e.knn_k), 'metric': e.knn_metric,
                      'reference_split': ref, 'reference_examples': len(y_ref),
                      'accuracy': rep['accuracy'], 'f1_macro': rep['macro_avg']['f1'],
                      'report': os.path.join(knn_dir, 'report.md')}
  summary['projection'] = projection_png(
      feats, labels, names, os.path.join(out_dir, 'projection.png'), tsne_max=int(e.tsne_max),
      title=f"{extractor.kind} features ({feats.shape[1]}-d) of {data.name} '{what}'")
  summary['wall_time_s'] = time.perf_counter() - t0
  with open(os.path.join(out_dir, 'embed_report.json'), 'w') as f:
    json.dump(metrics.json_safe(summary), f, indent=1)
  with open(os.path.join(out_dir, 'embed_report.md'), 'w') as f:
    f.write(_markdown(summary))
  print(_markdown(summary).strip() + f'\nOutput: {out_dir}', flush=True)
  return summary


def _markdown(s: dict[str, Any]) -> str:
  lines = [f"# Embeddings: {s['extractor']} features of {s['embedded']}", '',
           f"- {s['num_examples']} examples x {s['dims']} dimensions: " + ', '.join(
               os.path.basename(f) for f in s['files'])]
  if 'knn' in s:
    k = s['knn']
    asked = (f", knn_k={k['k_requested']} capped at the reference's size"
             if k.get('k_requested', k['k']) != k['k'] else '')
    lines.append(f"- {k['k']}-NN ({k['metric']}, reference '{k['reference_split']}', "
                 f"{k['reference_examples']} examples{asked}): top-1 {100 * k['accuracy']:.2f}%, "
                 f"macro F1 {k['f1_macro']:.4f} (report: knn/report.md)")
  p = s['projection']
  lines.append(f"- projection.png: PCA of {p['pca_points']} points"
               + (f", t-SNE of {p['tsne_points']}" if p['tsne_points'] else ''))
  return '\n'.join(lines) + '\n'
