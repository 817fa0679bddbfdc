"""The k-NN evaluation and the 2-D projection of ``--mode=embed`` (``embed.py``).

Single-label: a distance-weighted k-NN classifier (scikit-learn) gives class probabilities, and the
report is ``--mode=evaluate``'s. Its top-1 and top-5 rank the classes by probability, ties (equal
vote shares; every class no neighbour voted for, whether the reference set has it or not) broken
by class index ascending, as a stable sort gives and as the project's other predictors rank
(``answers.top_k``, ``report.eval_sums``): the ranking depends on the probabilities alone. Which
reference examples count when several lie at the k-th distance is scikit-learn's choice, as in its
own classifier. Tags (multi-label runs, multi-hot labels): each tag is predicted
when at least half of the k nearest reference examples carry it (an unweighted vote: the score of a
tag is the fraction of the neighbours that have it), and the report is the multi-label one (F1
micro / macro and exact match at 0.5, mAP of the vote fractions).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from imgcls_jax.errors import UserError

_FLOOR = float(np.finfo(np.float32).tiny)   # the probability a class without a vote scores with


def knn_metrics() -> list[str]:
  """The metrics the k-NN evaluation takes: scikit-learn's for brute-force neighbours, less
  'precomputed' (distances, not features), 'haversine' (2-D points only) and those that need
  parameters no config key gives ('mahalanobis', 'seuclidean')."""
  from sklearn.neighbors import VALID_METRICS
  unusable = {'precomputed', 'haversine', 'mahalanobis', 'seuclidean'}
  return sorted(set(VALID_METRICS['brute']) - unusable)


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


def knn_probabilities(ref_features: np.ndarray, ref_labels: np.ndarray, features_NxD: np.ndarray,
                      num_classes: int, *, k: int, metric: str) -> np.ndarray:
  """``N x num_classes`` float64 probabilities of the distance-weighted k-NN (``knn_evaluate``),
  0 for the classes the reference set lacks."""
  probs, classes = knn_evaluate(ref_features, ref_labels, features_NxD, k=k, metric=metric)
  full = np.zeros((len(features_NxD), num_classes))
  full[:, classes] = probs
  return full


def knn_tag_votes(ref_features: np.ndarray, ref_tags_NxT: np.ndarray, features_NxD: np.ndarray,
                  *, k: int, metric: str) -> np.ndarray:
  """``N x T`` float32: the fraction of each example's ``k`` nearest reference examples that carry
  each tag (the mean of their multi-hot rows); a tag is predicted where it is >= 0.5."""
  from sklearn.neighbors import NearestNeighbors
  if k < 1:
    raise UserError(f'config.embed.knn_k={k} must be at least 1.')
  nn = NearestNeighbors(n_neighbors=min(k, len(ref_tags_NxT)), metric=metric, algorithm='brute')
  nn.fit(ref_features)
  idx = nn.kneighbors(features_NxD, return_distance=False)
  return (np.asarray(ref_tags_NxT, np.float64) > 0.5)[idx].mean(axis=1).astype(np.float32)


def knn_report(ref_features: np.ndarray, ref_labels: np.ndarray, features_NxD: np.ndarray,
               labels: np.ndarray, class_names: list[str], *, k: int, metric: str,
               calibration_bins: int) -> dict[str, Any]:
  """The evaluation report (``report.json``'s contents) of the k-NN's predictions of ``labels``:
  single-label for class indices (N), multi-label for multi-hot rows (N x T)."""
  if labels.ndim == 2:
    import jax.numpy as jnp
    from imgcls_jax import multilabel, report_multilabel
    votes = knn_tag_votes(ref_features, ref_labels, features_NxD, k=k, metric=metric)
    y = (labels > 0).astype(np.float32)
    p = np.clip(votes.astype(np.float64), 1e-7, 1 - 1e-7)   # as eval_steps clips
    loss = -(y * np.log(p) + (1 - y) * np.log1p(-p)).mean(-1).sum()
    sums = multilabel.sums(jnp.asarray(votes), jnp.asarray(y), jnp.ones(len(y), bool),
                           calibration_bins=calibration_bins)
    sums = {key: np.asarray(v) for key, v in sums.items()}
    rep = report_multilabel.summarize({**sums, 'loss': loss}, class_names)
    rep['thresholds_source'] = ('a tag is predicted when at least half of the k nearest reference '
                                'examples carry it (vote fraction >= 0.5)')
    return rep
  from imgcls_jax import report as report_lib
  full = knn_probabilities(ref_features, ref_labels, features_NxD, len(class_names), k=k,
                           metric=metric)
  # Every class without a vote (in the reference set or not) at one floor: tied, so the top-k
  # (a stable one) takes them by class index.
  scores = np.log(np.maximum(full, _FLOOR)).astype(np.float32)
  rep = report_lib.summarize(report_lib.sums_of_scores(scores, labels, calibration_bins),
                             class_names)
  none = int(np.sum(full[np.arange(len(labels)), labels] == 0))
  if none:   # a vote share of 0 for the true class: the log loss is infinite, not a clip's figure
    rep['loss'] = float('inf')
    rep['loss_note'] = (f'{none} of {len(labels)} examples had no neighbour of their own class '
                        f'among the {k} nearest (k-NN probability 0), so the log loss is '
                        'infinite; accuracy, F1 and the ranking figures stand.')
  return rep


def headline(rep: dict[str, Any]) -> dict[str, Any]:
  """The k-NN numbers ``embed_report.json`` keeps: accuracy and macro F1 for classes; for tags
  (``task: 'multilabel'``) F1 micro / macro and exact match at 0.5 and mAP."""
  if rep.get('task') == 'multilabel':
    half = rep['at_0.5']
    return {'task': 'multilabel', 'metrics_for': 'tags (vote fraction >= 0.5)',
            'f1_micro': half['f1_micro'], 'f1_macro': half['f1_macro'],
            'exact_match': half['exact_match'], 'hamming_loss': half['hamming_loss'],
            'map': rep['mean_average_precision']}
  return {'task': 'single-label', 'accuracy': rep['accuracy'], 'f1_macro': rep['macro_avg']['f1']}


def colour_classes(labels: np.ndarray) -> tuple[np.ndarray, str]:
  """(one class per example, -1 = none; what it is): the label itself, or for multi-hot rows the
  first tag each example carries (-1: no tag or unknown)."""
  if labels.ndim == 1:
    return labels, 'class'
  first = np.argmax(labels > 0, axis=1)
  return np.where(np.any(labels > 0, axis=1), first, -1), 'first tag (in tag order)'


def projection_png(features_NxD: np.ndarray, labels: np.ndarray, class_names: list[str],
                   path: str, *, tsne_max: int, title: str, seed: int = 0) -> dict[str, Any]:
  """PCA (and t-SNE of up to ``tsne_max`` points) scatter plots coloured by class (multi-hot
  labels: by each example's first tag); returns what was drawn."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from sklearn.decomposition import PCA
  from sklearn.manifold import TSNE
  labels_N, coloured_by = colour_classes(np.asarray(labels))
  tagged = np.asarray(labels).ndim == 2
  unknown = np.asarray(labels).reshape(len(labels), -1).min(axis=1) < 0 if len(labels) else []
  n = len(features_NxD)
  panels = [('PCA', PCA(2, random_state=seed).fit_transform(features_NxD),
             np.arange(n))] if n >= 2 else []
  drawn: dict[str, Any] = {'pca_points': n if panels else 0, 'tsne_points': 0}
  if tagged and not np.all(unknown):
    drawn['coloured_by'] = coloured_by
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
    lab, unk = labels_N[idx], np.asarray(unknown, bool)[idx]
    for sel, what in ((unk, 'unlabelled'), ((lab < 0) & ~unk, 'no tag')):
      if sel.any():
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, c='grey', label=what)
    for c, cname in enumerate(class_names):
      sel = lab == c
      if sel.any():
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(c % cmap.N), label=cname, alpha=0.7)
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
  if panels:
    axes[0][-1].legend(loc='center left', bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8,
                       title='first tag' if tagged else None)
  fig.suptitle(title + (' - coloured by the first tag of each image' if tagged else ''))
  fig.tight_layout()
  fig.savefig(path, dpi=90, format='png')
  plt.close(fig)
  return drawn
