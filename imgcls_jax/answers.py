"""What one prediction says, from its probabilities (and logits) and the run's decision rules: the
top-k classes, a tagging run's tags at its thresholds, and the single-label gates (abstaining
below the run's confidence threshold, ``selective.py``; "none of the classes" below its
log-sum-exp threshold, ``ood.py``). Shared by predict, serve and the evaluation's listings."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from imgcls_jax import ood, selective


def tags(probs_K: np.ndarray, class_names: Sequence[str],
         thresholds: Sequence[float]) -> list[dict[str, Any]]:
  """A multi-label prediction: the classes whose probability reaches their threshold, most
  probable first, as ``{'class', 'index', 'probability', 'threshold'}``."""
  above = [i for i in np.argsort(-probs_K, kind='stable')
           if np.float32(probs_K[i]) >= np.float32(thresholds[i])]   # the device's rule
  return [{'class': class_names[i], 'index': int(i), 'probability': float(probs_K[i]),
           'threshold': float(thresholds[i])} for i in above]


def answer_gates(trained: Any, probs_K: np.ndarray, logits_K: np.ndarray) -> dict[str, Any]:
  """A single-label answer's fields from the run's gates: ``abstained`` (below its confidence
  threshold) and ``unknown`` (below its log-sum-exp threshold, ``ood.gate``), each only where the
  run has that gate."""
  out: dict[str, Any] = {}
  if trained.min_confidence > 0:
    out.update(abstained(probs_K, trained.min_confidence))
  if trained.unknown_below is not None:
    out.update(ood.gate(logits_K, trained.unknown_below))
  return out


def abstained(probs_K: np.ndarray, min_confidence: float) -> dict[str, Any]:
  """A single-label answer's abstention fields: ``abstained`` when the top-1 probability is below
  the run's threshold (``selective.answered``'s rule), and the threshold."""
  return {'abstained': not bool(selective.answered(np.max(probs_K), min_confidence)),
          'min_confidence': float(min_confidence)}


def top_k(probs_K: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
  """The ``k`` most probable classes, best first, as ``{'class', 'index', 'probability'}``."""
  order = np.argsort(-probs_K, kind='stable')[:max(1, min(k, len(probs_K)))]
  return [{'class': class_names[i], 'index': int(i), 'probability': float(probs_K[i])}
          for i in order]
