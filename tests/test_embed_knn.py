"""The k-NN evaluation's ranking (``embed_knn.knn_report``): its top-1 and top-5 are scikit-learn's
``KNeighborsClassifier.predict_proba`` ranked by a stable sort (ties by class index ascending, as
``answers.top_k`` ranks), whichever classes the reference set has and in whatever order its
examples come.
"""
import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from imgcls_jax import embed_knn

K = 12
NAMES = [f'c{i}' for i in range(K)]
ABSENT = (0, 1, 6, 9)   # classes the reference set lacks: k-NN probability 0 like any unvoted one


def _data():
  """(reference features, their classes, query features): 40 reference examples of 8 of the 12
  classes at random (no two at one distance from a query: one k-NN), 30 queries near them, and a
  query at the origin whose 3 nearest vote exactly 0.4 (classes 7 and 2, distance 1) and 0.2
  (class 5, distance 2)."""
  rng = np.random.RandomState(0)
  present = np.array([c for c in range(K) if c not in ABSENT])
  ref = rng.normal(size=(40, 4)) * 3 + 10
  ref_y = present[rng.randint(0, len(present), 40)]
  x = ref[rng.randint(0, 40, 30)] + rng.normal(size=(30, 4))
  tied = np.array([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 2, 0, 0]], np.float64)
  return (np.concatenate([ref, tied]), np.concatenate([ref_y, [7, 2, 5]]),
          np.concatenate([x, np.zeros((1, 4))]))


def _oracle_top(ref, ref_y, x, k):
  """``N x 5`` classes, best first: scikit-learn's probabilities (0 for the classes the reference
  lacks) under a stable sort."""
  knn = KNeighborsClassifier(n_neighbors=k, weights='distance', algorithm='brute').fit(ref, ref_y)
  probs = np.zeros((len(x), K))
  probs[:, knn.classes_] = knn.predict_proba(x)
  return np.argsort(-probs, axis=1, kind='stable')[:, :5]


def _report_counts(ref, ref_y, x, k):
  """For each class c, from the report of every query labelled c: (how many queries the top-1
  gives c, how many have c in their top-5)."""
  n = len(x)
  counts = []
  for c in range(K):
    rep = embed_knn.knn_report(ref, ref_y, x, np.full(n, c), NAMES, k=k, metric='euclidean',
                               calibration_bins=10)
    counts.append((round(rep['accuracy'] * n), round(rep['accuracy_top5'] * n)))
  return counts


def test_knn_top1_and_top5_are_sklearns_probabilities_under_a_stable_sort():
  """Classes without a vote tie at probability 0, whether the reference set has them or not: a
  stable sort takes the lowest indices (here the absent 0 and 1 before the present 3 and 4), as
  it orders the exact 0.4 / 0.4 tie of the query at the origin (class 2 before 7). Shuffling the
  reference examples and the queries changes none of it."""
  ref, ref_y, x = _data()
  k = 3
  top = _oracle_top(ref, ref_y, x, k)
  np.testing.assert_array_equal(top[-1], [2, 7, 5, 0, 1])
  assert np.isin(top[:, 3:], ABSENT).any()   # the ties at 0 reach into the top-5
  want = [(int(np.sum(top[:, 0] == c)), int(np.sum(np.any(top == c, axis=1)))) for c in range(K)]
  assert _report_counts(ref, ref_y, x, k) == want
  rng = np.random.RandomState(1)
  r, q = rng.permutation(len(ref)), rng.permutation(len(x))
  shuffled = ref[r], ref_y[r], x[q]
  np.testing.assert_array_equal(_oracle_top(*shuffled, k), top[q])
  assert _report_counts(*shuffled, k) == want


def test_knn_probabilities_are_sklearns_with_zeros_for_the_classes_the_reference_lacks():
  ref, ref_y, x = _data()
  full = embed_knn.knn_probabilities(ref, ref_y, x, K, k=3, metric='euclidean')
  knn = KNeighborsClassifier(n_neighbors=3, weights='distance', algorithm='brute').fit(ref, ref_y)
  np.testing.assert_array_equal(full[:, knn.classes_], knn.predict_proba(x))
  assert full.shape == (len(x), K) and not full[:, list(ABSENT)].any()
  np.testing.assert_allclose(full[-1, [2, 5, 7]], [0.4, 0.2, 0.4], rtol=1e-15)
