"""The evaluation report: every metric against sklearn.metrics on the same predictions."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from imgcls_jax import report, report_text, roc, run, sharding
from imgcls_jax.errors import UserError

# As the eval step runs it: jitted (eagerly, each of its ops compiles alone: ~15 s a call).
_eval_sums = jax.jit(report.eval_sums, static_argnums=3)


def _predictions(n, k, seed, missing_class=None, sharpness=3.0):
  """Random logits with a signal (so accuracy is neither 0 nor 1) and their labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  if missing_class is not None:
    labels[labels == missing_class] = (missing_class + 1) % k
  logits = rng.normal(size=(n, k)).astype(np.float32)
  logits[np.arange(n), labels] += sharpness * rng.random(n).astype(np.float32)
  return logits, labels


def _softmax64(logits):
  z = logits.astype(np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def _stats_in_padded_sharded_batches(logits, labels, batch, num_bins=15):
  """batch_stats jitted over an 8-device mesh, on padded + masked batches, summed by the trainer's
  own evaluation loop (``run.eval_sums``: one batch in flight on CPU devices, as XLA:CPU's
  all-reduce needs under load)."""
  mesh = sharding.make_mesh(0)
  fn = jax.jit(lambda _, b: report.eval_sums(b['logits'], b['label'], b['mask'], num_bins),
               out_shardings=sharding.replicated(mesh))
  rng = np.random.default_rng(1)
  batches = []
  for start in range(0, len(labels), batch):
    lg, lb = logits[start:start + batch], labels[start:start + batch]
    real = len(lb)
    pad = batch - real  # padded rows hold garbage: they must add nothing
    lg = np.concatenate([lg, rng.normal(size=(pad, lg.shape[1])).astype(np.float32) * 10])
    lb = np.concatenate([lb, rng.integers(0, lg.shape[1], pad)]).astype(np.int32)
    batches.append({'logits': lg, 'label': lb, 'mask': np.arange(batch) < real})
  return report.stats_to_numpy(run.eval_sums(fn, None, batches, mesh, 'test'))


@pytest.mark.parametrize('k,missing', [(10, None), (7, 3), (4, None)])
def test_every_metric_matches_sklearn(k, missing):
  n = 301
  logits, labels = _predictions(n, k, seed=k, missing_class=missing)
  stats = _stats_in_padded_sharded_batches(logits, labels, batch=64)
  names = [f'class_{i}' for i in range(k)]
  rep = report.summarize(stats, names, top_confused=5)
  probs = _softmax64(logits)
  pred = probs.argmax(axis=1)
  all_labels = list(range(k))

  assert rep['num_examples'] == n
  assert rep['accuracy'] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-12)
  assert rep['loss'] == pytest.approx(skm.log_loss(labels, probs, labels=all_labels), rel=1e-5)
  if k > 5:
    assert rep['accuracy_top5'] == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=5, labels=all_labels), abs=1e-12)
  else:
    assert 'accuracy_top5' not in rep  # trivially 1 with <= 5 classes

  cm = skm.confusion_matrix(labels, pred, labels=all_labels)
  np.testing.assert_array_equal(np.array(rep['confusion_matrix']), cm)

  p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=all_labels,
                                                   zero_division=0)
  got = {key: np.array([row[key] for row in rep['per_class']])
         for key in ('precision', 'recall', 'f1', 'support')}
  np.testing.assert_allclose(got['precision'], p, atol=1e-12)
  np.testing.assert_allclose(got['recall'], r, atol=1e-12)
  np.testing.assert_allclose(got['f1'], f, atol=1e-12)
  np.testing.assert_array_equal(got['support'], s)
  assert [row['class'] for row in rep['per_class']] == names
  for avg in ('macro', 'weighted'):
    ap, ar, af, _ = skm.precision_recall_fscore_support(labels, pred, average=avg,
                                                        zero_division=0)
    assert rep[f'{avg}_avg']['precision'] == pytest.approx(ap, abs=1e-12)
    assert rep[f'{avg}_avg']['recall'] == pytest.approx(ar, abs=1e-12)
    assert rep[f'{avg}_avg']['f1'] == pytest.approx(af, abs=1e-12)
    assert rep[f'{avg}_avg']['f1'] == pytest.approx(skm.f1_score(labels, pred, average=avg,
                                                                 zero_division=0), abs=1e-12)
  if missing is not None:
    assert rep['per_class'][missing]['support'] == 0

  # Calibration: sklearn's binning of the top-1 confidence against top-1 correctness.
  conf, correct = probs.max(axis=1), (pred == labels).astype(int)
  prob_true, prob_pred = calibration_curve(correct, conf, n_bins=15, strategy='uniform')
  counts, _ = np.histogram(conf, bins=np.linspace(0, 1, 16))
  filled = [b for b in rep['calibration_bins'] if b['count']]
  assert [b['count'] for b in filled] == [int(c) for c in counts if c]
  np.testing.assert_allclose([b['accuracy'] for b in filled], prob_true, atol=1e-12)
  np.testing.assert_allclose([b['confidence'] for b in filled], prob_pred, rtol=1e-5)
  ece = np.sum(counts[counts > 0] / n * np.abs(prob_true - prob_pred))
  assert rep['ece'] == pytest.approx(ece, abs=1e-5)
  assert 0 < rep['ece'] < 1

  # Most confused pairs: the largest off-diagonal cells of sklearn's matrix, in order.
  off = cm.copy()
  np.fill_diagonal(off, 0)
  expected = sorted(((-off[t, q], t, q) for t in range(k) for q in range(k) if off[t, q]))[:5]
  assert [(p['true_index'], p['predicted_index'], p['count']) for p in rep['most_confused']] == [
      (t, q, -c) for c, t, q in expected]
  assert rep['most_confused'][0]['true'] == names[expected[0][1]]
  json.dumps(rep)  # JSON-ready

  # Rare-class metrics: balanced accuracy, sensitivity / specificity, normalised confusion.
  assert rep['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(labels, pred),
                                                   abs=1e-12)
  for i in range(k):
    if missing == i:
      continue
    row = rep['per_class'][i]
    assert row['sensitivity'] == pytest.approx(skm.recall_score(labels == i, pred == i), abs=1e-12)
    assert row['specificity'] == pytest.approx(
        skm.recall_score(labels == i, pred == i, pos_label=False), abs=1e-12)
  np.testing.assert_allclose(
      rep['confusion_matrix_normalized'],
      np.nan_to_num(skm.confusion_matrix(labels, pred, labels=all_labels, normalize='true')),
      atol=1e-12)
  # One-vs-rest ROC-AUC: exactly sklearn's on the binned scores, and close to it on the raw ones.
  binned = np.asarray(roc.score_bin(jnp.asarray(probs.astype(np.float32))))
  raw_gap = []
  for i in range(k):
    if missing == i:
      assert rep['per_class'][i]['roc_auc'] is None
      continue
    exact = skm.roc_auc_score(labels == i, binned[:, i])
    assert rep['per_class'][i]['roc_auc'] == pytest.approx(exact, abs=1e-12)
    raw_gap.append(abs(rep['per_class'][i]['roc_auc'] - skm.roc_auc_score(labels == i, probs[:, i])))
  assert max(raw_gap) < 5e-3
  present = [i for i in range(k) if i != missing]
  assert rep['roc_auc_macro'] == pytest.approx(
      np.mean([skm.roc_auc_score(labels == i, binned[:, i]) for i in present]), abs=1e-12)
  if missing is None:  # sklearn's own one-vs-rest macro average, on the raw scores
    assert rep['roc_auc_macro'] == pytest.approx(skm.roc_auc_score(labels, probs,
                                                                   multi_class='ovr'), abs=5e-3)
  curve = rep['roc_curves'][0]
  fpr, tpr, _ = skm.roc_curve(labels == rep['class_names'].index(curve['class']),
                              binned[:, rep['class_names'].index(curve['class'])])
  assert curve['fpr'][0] == 0 and curve['tpr'][-1] == 1
  assert np.trapezoid(curve['tpr'], curve['fpr']) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-5)


def test_batches_and_devices_do_not_change_the_statistics():
  logits, labels = _predictions(200, 10, seed=3)
  one = report.stats_to_numpy(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                                 jnp.ones(200, bool)))
  many = _stats_in_padded_sharded_batches(logits, labels, batch=24)
  for key in report.STAT_KEYS:
    np.testing.assert_allclose(one[key], many[key], rtol=1e-5, err_msg=key)
  assert one['confusion'].sum() == 200 and one['bin_count'].sum() == 200


def test_host_scores_padded_to_a_bucket_give_the_same_statistics_as_the_rows_alone():
  """report.sums_of_scores (classical models, k-NN) pads to 1,024 rows with masked-out rows: the
  sums are those of the real rows (as sklearn counts them), whatever the bucket's fill."""
  for n in (1, 1000, 1025):
    logits, labels = _predictions(n, 7, seed=n)
    got = report.sums_of_scores(logits, labels, 15)
    want = report.stats_to_numpy(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.ones(n, bool), 15))
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f'{n} {key}')
    np.testing.assert_array_equal(got['confusion'], skm.confusion_matrix(
        labels, logits.argmax(-1), labels=range(7)))
    assert got['count'] == n
  # A class no example can have (k-NN's and the classical models' -1e9 for classes they never
  # saw) and a non-finite row sum as the rows alone do.
  logits, labels = _predictions(300, 5, seed=7)
  logits[:, 4] = -1e9
  logits[3] = np.nan
  got, want = report.sums_of_scores(logits, labels, 10), report.stats_to_numpy(
      _eval_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(300, bool), 10))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  with pytest.raises(UserError, match='calibration_bins=0 must be an integer >= 1'):
    report.sums_of_scores(logits, labels, 0)


def test_confidence_of_one_falls_in_the_last_bin_like_sklearn():
  logits = jnp.array([[100.0, 0.0], [0.0, 0.0]])  # confidences 1.0 and 0.5
  s = report.stats_to_numpy(_eval_sums(logits, jnp.array([0, 1]), jnp.ones(2, bool), 10))
  assert s['bin_count'][-1] == 1 and s['bin_count'][4] == 1  # 0.5 is in (0.4, 0.5]
  _, prob_pred = calibration_curve([1, 0], [1.0, 0.5], n_bins=10)
  np.testing.assert_allclose(sorted(prob_pred), [0.5, 1.0])


def test_scalars_and_training_metrics_agree_with_the_report():
  logits, labels = _predictions(150, 12, seed=5)
  stats = report.stats_to_numpy(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                                   jnp.ones(150, bool)))
  rep = report.summarize(stats, [str(i) for i in range(12)])
  flat = report.scalars(rep)
  assert set(flat) == set(report.SCALAR_KEYS)
  assert flat['f1_macro'] == rep['macro_avg']['f1']
  assert flat['recall_weighted'] == pytest.approx(rep['accuracy'])  # weighted recall == accuracy
  logged = report.training_eval_metrics(stats)
  assert logged['count'] == 150
  for key, value in flat.items():
    assert logged[key] == pytest.approx(value)


def test_text_renderings_name_every_class():
  logits, labels = _predictions(90, 3, seed=7, sharpness=0.5)
  names = ['cat', 'dog', 'bird']
  rep = report.summarize(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.ones(90, bool)), names)
  md = report_text.to_markdown(rep, 'Title', {'split': 'test'})
  csv_text = report_text.confusion_csv(rep)
  for name in names:
    assert f'| {name} |' in md
  rows = [line.split(',') for line in csv_text.strip().splitlines()]
  assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names
  assert sum(int(v) for r in rows[1:] for v in r[1:]) == 90
  table = report_text.class_table(rep)
  assert len(table) == 4 and table[1].startswith('cat')
  worst = report_text.class_table(rep, max_rows=2)
  assert len(worst) == 3 and '2 lowest F1 of 3' in worst[0]


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_averages():
  labels = np.array([0, 0, 1, 2, 2, 2])
  pred = np.array([0, 1, 1, 2, 2, 0])
  logits = np.eye(4, dtype=np.float32)[pred] * 5  # class 3: never true, never predicted
  rep = report.summarize(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.ones(6, bool)), ['a', 'b', 'c', 'd'])
  for avg in ('macro', 'weighted'):
    p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, average=avg, zero_division=0)
    assert (rep[f'{avg}_avg']['precision'], rep[f'{avg}_avg']['recall'],
            rep[f'{avg}_avg']['f1']) == pytest.approx((p, r, f), abs=1e-12)
  assert rep['per_class'][3] == {'class': 'd', 'precision': 0.0, 'recall': 0.0, 'f1': 0.0,
                                 'support': 0, 'sensitivity': 0.0, 'specificity': 1.0,
                                 'roc_auc': None,   # no positives: no ROC curve
                                 'in_macro_avg': False}
  assert rep['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(labels, pred))


def test_the_report_says_which_classes_its_macro_averages_cover():
  """Only some classes in the split (an eval folder of two digits): the macro averages run over
  the classes with an example or a prediction, which the report names; the per-class table showed
  0.0000 for every other class, as if they had been scored (and averaged)."""
  labels = np.array([3] * 5 + [8] * 5)
  pred = np.array([3, 3, 3, 8, 1, 8, 8, 8, 8, 3])   # class 1: predicted once, never true
  logits = np.eye(10, dtype=np.float32)[pred] * 5
  rep = report.summarize(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.ones(10, bool)), [str(i) for i in range(10)])
  covered = [i for i, r in enumerate(rep['per_class']) if r['in_macro_avg']]
  assert covered == [1, 3, 8] and rep['macro_avg_classes'] == 3
  p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=covered, average='macro',
                                                   zero_division=0)
  assert (rep['macro_avg']['precision'], rep['macro_avg']['recall'],
          rep['macro_avg']['f1']) == pytest.approx((p, r, f), abs=1e-12)
  md = report_text.to_markdown(rep, 'Title', {'split': 'test'})
  assert '| macro (over 3 of 10 classes) |' in md
  assert 'The macro averages run over the 3 of 10 classes that have an example or a prediction '\
         'here (1, 3, 8); the other 7 have neither' in md
  assert "1: predicted but with no example, so no recall ('-')" in md
  per_class = md.split('## Per class')[1].split('##')[0]
  rows = {line.split(' | ')[0][2:]: line.split(' | ') for line in per_class.splitlines()
          if line.startswith('| ') and line.split(' | ')[0][2:].isdigit()}
  assert rows['0'][1:3] == ['-', '-'] and rows['0'][4] == '-'      # precision, recall, F1
  assert rows['1'][1:3] == ['0.0000', '-'] and rows['1'][4] == '0.0000'
  assert rows['3'][1:3] == [f"{skm.precision_score(labels, pred, labels=[3], average='macro'):.4f}",
                            f"{skm.recall_score(labels, pred, labels=[3], average='macro'):.4f}"]
  table = report_text.class_table(rep)
  assert table[1].split() == ['0', '-', '-', '-', '0']
  assert report_text.class_table(rep, max_rows=3)[1].split()[0] in ('1', '3', '8')   # scored first
  assert '(over 3 of 10 classes)' in report_text.headline(rep)[2]
  # Every class present: nothing more is said.
  full = report.summarize(_eval_sums(jnp.asarray(np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]),
                                     jnp.asarray(np.array([0, 1, 2, 2])), jnp.ones(4, bool)),
                          ['a', 'b', 'c'])
  assert 'over' not in report_text.to_markdown(full, 'T', {}).split('## Per class')[0]


def test_a_report_written_over_an_earlier_one_leaves_none_of_its_files(tmp_path):
  from imgcls_jax import report_files
  logits, labels = _predictions(60, 3, seed=2)
  rep = report.summarize(_eval_sums(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.ones(60, bool)), ['a', 'b', 'c'])
  assert rep.get('roc_curves')
  metrics_log = tmp_path / 'metrics.jsonl'
  metrics_log.write_text(json.dumps({'step': 1, 'train_loss': 1.0}) + '\n'
                         + json.dumps({'step': 2, 'train_loss': 0.5}) + '\n')
  out = tmp_path / 'out'
  written = report_files.write(rep, str(out), 'First', str(metrics_log))
  assert set(written) == set(report_files.REPORT_FILES) | {report_files.CURVES_FILE}
  assert sorted(p.name for p in out.iterdir()) == sorted(written)
  assert json.loads((out / 'report.json').read_text())['files'] == written
  # As if the earlier report had been a tagging one's: its PR plot is listed, so it goes too.
  (out / 'pr_curves.png').write_bytes(b'from a multi-label report')
  saved = json.loads((out / 'report.json').read_text())
  (out / 'report.json').write_text(json.dumps({**saved, 'files': written + ['pr_curves.png']}))
  (out / 'notes.txt').write_text('mine')          # not a report's: left alone
  # A second report without ROC curves and without a training log: their old plots must go.
  second = {k: v for k, v in rep.items() if k not in ('roc_curves', 'roc_auc_macro')}
  written = report_files.write(second, str(out), 'Second', str(tmp_path / 'none.jsonl'))
  assert 'roc_curves.png' not in written and report_files.CURVES_FILE not in written
  assert sorted(p.name for p in out.iterdir()) == sorted(written + ['notes.txt'])
  line = report_files.table_lines(second, 'Second', str(out))[-1]
  assert 'roc_curves.png' not in line and report_files.CURVES_FILE not in line
  assert 'reliability.png' in line
  # A folder of the user's own files, one of them named like a report file: nothing is removed.
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'errors.csv').write_text('my own list')
  report_files.write(second, str(mine), 'Third', None)
  assert (mine / 'errors.csv').read_text() == 'my own list'
