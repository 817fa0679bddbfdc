"""PNG figures of a report and of a run: confusion matrix, reliability diagram, training curves.

matplotlib with the non-interactive Agg backend (no display needed); each function writes one PNG.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MAX_TICK_LABELS = 40     # beyond this many classes the axes are not labelled per class
_MAX_ANNOTATED = 20       # beyond this many classes the cells carry no numbers


def confusion_matrix(confusion_KxK: Sequence[Sequence[int]], class_names: Sequence[str],
                     path: str, title: str = 'Confusion matrix') -> None:
  """Row-normalised heat map (colour = share of the true class) with counts in the cells."""
  cm = np.asarray(confusion_KxK, np.int64)
  k = cm.shape[0]
  support = cm.sum(axis=1, keepdims=True)
  share = np.divide(cm, support, out=np.zeros(cm.shape, np.float64), where=support > 0)
  size = min(4 + 0.45 * k, 24)
  fig, ax = plt.subplots(figsize=(size + 1.5, size))
  im = ax.imshow(share, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label='share of true class')
  if k <= _MAX_TICK_LABELS:
    ax.set_xticks(range(k), labels=list(class_names), rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), labels=list(class_names))
  if k <= _MAX_ANNOTATED:
    for t in range(k):
      for p in range(k):
        if cm[t, p]:
          ax.text(p, t, str(cm[t, p]), ha='center', va='center', fontsize=8,
                  color='white' if share[t, p] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(f'{title} ({int(cm.sum())} examples)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def roc_curves(curves: Sequence[Mapping[str, Any]], macro_auc: float, path: str,
               title: str = 'ROC curves (one-vs-rest)') -> None:
  """True- against false-positive rate per class, each labelled with its AUC."""
  fig, ax = plt.subplots(figsize=(6.5, 6))
  for c in curves:
    ax.plot(c['fpr'], c['tpr'], lw=1.4, label=f"{c['class']} (AUC {c['auc']:.3f})")
  ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel('false-positive rate (1 - specificity)')
  ax.set_ylabel('true-positive rate (sensitivity)')
  ax.set_title(f'{title}; macro AUC {macro_auc:.4f}')
  ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def selective(sel: Mapping[str, Any], path: str,
              title: str = 'Selective prediction') -> None:
  """The accuracy of the answers against the share answered (coverage), answering the most
  confident first (``selective.summary``'s curve), with the run's threshold marked."""
  curve = sel['curve']
  fig, ax = plt.subplots(figsize=(6.5, 5))
  ax.step(curve['coverage'], curve['accuracy'], where='post', lw=1.4)
  if 'at_min_confidence' in sel and sel['at_min_confidence']['accuracy'] is not None:
    r = sel['at_min_confidence']
    ax.plot([r['coverage']], [r['accuracy']], 'o', color='C3',
            label=f"the run's threshold {r['threshold']:.3f}: {100 * r['coverage']:.1f}% answered, "
                  f"{100 * r['accuracy']:.2f}% right")
    ax.legend(fontsize=8, loc='lower left')
  ax.set_xlim(0, 1.0)
  ax.set_xlabel('coverage (share of examples answered, most confident first)')
  ax.set_ylabel('accuracy of the answers')
  ax.grid(alpha=0.3)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def reliability_diagram(bins: Sequence[Mapping[str, Any]], ece: float, path: str,
                        title: str = 'Reliability diagram', *, tags: bool = False) -> None:
  """Accuracy per confidence bin against the diagonal, with the example count per bin below.
  With ``tags`` (a multi-label report's bins): the fraction of (example, tag) pairs labelled, per
  bin of the tag's probability."""
  outcome = 'fraction_positive' if tags else 'accuracy'
  lower = np.array([b['lower'] for b in bins])
  upper = np.array([b['upper'] for b in bins])
  counts = np.array([b['count'] for b in bins], np.float64)
  acc = np.array([b[outcome] if b['count'] else np.nan for b in bins], np.float64)
  conf = np.array([b['confidence'] if b['count'] else np.nan for b in bins], np.float64)
  width = upper - lower
  fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(6, 7), sharex=True,
                                 gridspec_kw={'height_ratios': [3, 1]})
  filled = counts > 0
  ax.bar(lower[filled], acc[filled], width=width[filled], align='edge', color='tab:blue',
         edgecolor='black', label='fraction labelled' if tags else 'accuracy')
  # The gap between accuracy and mean confidence, hatched over or above the bar: above the bar the
  # model is over-confident in that bin, inside it under-confident.
  ax.bar(lower[filled], np.abs(conf - acc)[filled], bottom=np.minimum(acc, conf)[filled],
         width=width[filled], align='edge', fill=False, hatch='//', edgecolor='tab:red',
         linewidth=0.8, label='gap to mean confidence')
  ax.plot([0, 1], [0, 1], 'k--', linewidth=1, label='perfect calibration')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel('fraction of the pairs labelled' if tags else 'accuracy')
  ax.set_title(f'{title}: ECE {ece:.4f}')
  ax.legend(loc='upper left')
  ax_n.bar(lower, counts, width=width, align='edge', color='gray', edgecolor='black')
  ax_n.set_yscale('log' if counts.max(initial=0) > 100 else 'linear')
  ax_n.set_xlabel('tag probability' if tags else 'confidence (top-1 probability)')
  ax_n.set_ylabel('(example, tag) pairs' if tags else 'examples')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _latest_per_step(records: Sequence[Mapping[str, Any]], split: str,
                     key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of ``key`` for ``split``; a step logged twice (a resumed run) keeps its last
  value."""
  by_step: dict[int, float] = {}
  for r in records:
    if r.get('split') == split and key in r and r[key] is not None:
      value = float(r[key])
      if math.isfinite(value):
        by_step[int(r['step'])] = value
  steps = np.array(sorted(by_step), np.int64)
  return steps, np.array([by_step[s] for s in steps], np.float64)


def training_curves(records: Sequence[Mapping[str, Any]], path: str,
                    title: str = 'Training curves') -> None:
  """Loss and top-1 accuracy against steps, train and eval, from ``metrics.jsonl`` records."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, label in ((ax_loss, 'loss', 'loss'), (ax_acc, 'accuracy', 'top-1 accuracy')):
    for split, style in (('train', '-'), ('eval', 'o-')):
      steps, values = _latest_per_step(records, split, key)
      if len(steps):
        ax.plot(steps, values, style, label=split, markersize=4)
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  steps, loss = _latest_per_step(records, 'train', 'loss')
  if len(loss) and loss.min() > 0 and loss.max() / loss.min() > 20:
    ax_loss.set_yscale('log')
  last = max([int(r['step']) for r in records if 'step' in r], default=0)
  fig.suptitle(f'{title} (up to step {last})')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


_MAX_PR_LABELLED = 20     # beyond this many classes the PR curves are thin and unlabelled


def pr_curves(curves: Sequence[Mapping[str, Any]], mean_ap: float, path: str,
              micro: Mapping[str, Any] | None = None,
              title: str = 'Precision-recall curves') -> None:
  """Precision against recall per class (``curves``: ``class``, ``ap``, ``precision``,
  ``recall``), each labelled with its AP; beyond 20 classes thin unlabelled lines. ``micro`` (the
  pooled curve, same keys less ``class``) is drawn bold."""
  fig, ax = plt.subplots(figsize=(6.5, 6))
  labelled = len(curves) <= _MAX_PR_LABELLED
  for c in curves:
    if labelled:
      ax.step(c['recall'], c['precision'], where='post', lw=1.4,
              label=f"{c['class']} (AP {c['ap']:.3f})")
    else:
      ax.step(c['recall'], c['precision'], where='post', lw=0.5, alpha=0.5, color='tab:blue')
  if micro is not None:
    ax.step(micro['recall'], micro['precision'], where='post', lw=2.8, color='black',
            label=f"micro-average (AP {micro['ap']:.3f})")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel('recall')
  ax.set_ylabel('precision')
  ax.set_title(f'{title}; mAP {mean_ap:.4f}')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, loc='lower left')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: str, title: str,
               columns: int = 6) -> None:
  """Images (uint8 HxWxC, as the model saw them) in a grid, each with its caption below."""
  rows = max(1, -(-len(images) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows + 0.4), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, img, caption in zip(axes.ravel(), images, captions):
    img = np.asarray(img)
    grey = img.ndim == 2 or img.shape[-1] == 1
    ax.imshow(img.reshape(img.shape[:2]) if grey else img[..., :3], cmap='gray' if grey else None,
              vmin=0, vmax=255, interpolation='nearest')
    ax.set_title(caption, fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def sweep(settings: Sequence[Mapping[str, Any]], metric: str, path: str, title: str,
          missing: Sequence[str]) -> None:
  """A sweep's settings, best at the top: mean +- std over seeds, each seed a dot; a setting
  without a result shows ``missing`` (why, e.g. '2 diverged'); a setting's ``note`` (e.g.
  'stopped at 1/4 of the run') follows its name."""
  n = max(len(settings), 1)
  labels = [s['setting'][:100] + (f" [{s['note']}]" if s.get('note') else '') for s in settings]
  width = 9 + 0.06 * max(0, max(map(len, labels), default=0) - 60)   # room for long labels
  fig, ax = plt.subplots(figsize=(width, 1.2 + 0.38 * n))
  y = np.arange(len(settings))[::-1]
  scored = [(yy, s) for yy, s in zip(y, settings) if s['mean'] is not None]
  if scored:
    ax.errorbar([s['mean'] for _, s in scored], [yy for yy, _ in scored],
                xerr=[s['std'] for _, s in scored], fmt='D', color='tab:blue', markersize=6,
                capsize=4, label='mean +- std')
    for yy, s in scored:
      ax.plot(s['values'], [yy] * len(s['values']), 'o', color='tab:orange', markersize=3,
              alpha=0.8)
    ax.grid(axis='x', alpha=0.3)
    lo = min(min(s['values']) for _, s in scored)
    hi = max(max(s['values']) for _, s in scored)
    pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 0.01
    ax.set_xlim(lo - pad, hi + pad)
  for yy, s, why in zip(y, settings, missing):
    if s['mean'] is None:
      ax.text(0.01, yy, f'no result ({why})' if why else 'no result',
              transform=ax.get_yaxis_transform(), va='center', fontsize=8, color='tab:red')
  ax.set_yticks(y, labels=labels, fontsize=8)
  ax.set_ylim(-0.6, len(settings) - 0.4)
  ax.set_xlabel(f'{metric} (mean +- std over seeds; dots: seeds)')
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
