"""metrics.MetricWriter: TensorBoard scalars written without importing PyTorch at start-up."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

_SCRIPT = """
import sys, time
t = time.perf_counter()
from imgcls_jax import metrics
w = metrics.MetricWriter({workdir!r}, tensorboard=True)
w.write(7, 'eval', {{'accuracy': 0.25, 'loss': 1.5}})
w.close()
print('writer seconds', round(time.perf_counter() - t, 2))
assert 'torch' not in sys.modules, 'the writer imported PyTorch'
import torch                       # PyTorch itself still imports normally afterwards
print('torch', torch.__version__, float(torch.ones(2).sum()))
"""


def test_tensorboard_scalars_without_importing_torch(tmp_path):
  if importlib.util.find_spec('torch') is None:
    pytest.skip('PyTorch is not installed: nothing to keep out of the import')
  import tensorflow as tf
  workdir = str(tmp_path / 'run')
  r = subprocess.run([sys.executable, '-c', _SCRIPT.format(workdir=workdir)], cwd=REPO,
                     env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f'stdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}'
  assert 'torch 2.' in r.stdout and ' 2.0' in r.stdout
  values = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        values[(v.tag, event.step)] = v.simple_value
  assert values == {('eval/accuracy', 7): 0.25, ('eval/loss', 7): 1.5}


def test_metrics_jsonl_is_strict_json_with_undefined_values_as_null(tmp_path):
  """A ROC-AUC with no negative examples (every tag on every image) was written as NaN, which
  strict JSON readers (jq, JSON.parse, Go, Java) refuse; it is null now, and reads back so."""
  import json

  import numpy as np

  from imgcls_jax import metrics
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(5, 'eval', {'roc_auc_macro': float('nan'), 'loss': np.float32(np.inf),
                      'accuracy': np.float64(0.5), 'count': 3})
  line = (tmp_path / 'metrics.jsonl').read_text().strip()
  assert json.loads(line, parse_constant=lambda c: pytest.fail(f'non-strict JSON: {c}')) == {
      'step': 5, 'split': 'eval', 'roc_auc_macro': None, 'loss': None, 'accuracy': 0.5,
      'count': 3}
  assert metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))[0]['roc_auc_macro'] is None


def test_json_safe_turns_every_non_finite_number_into_null():
  """report.json, cv_report.json, compare.json, the sweep's and embed's summaries go through it."""
  import json

  import numpy as np

  from imgcls_jax import metrics
  tree = {'a': [1.0, float('nan'), np.float32(np.inf)], 'b': {'c': (np.float64(-np.inf), 2)},
          'd': 'NaN', 'e': np.float32(0.25)}
  text = json.dumps(metrics.json_safe(tree))
  assert json.loads(text, parse_constant=lambda c: pytest.fail(f'non-strict JSON: {c}')) == {
      'a': [1.0, None, None], 'b': {'c': [None, 2]}, 'd': 'NaN', 'e': 0.25}
