"""--mode=evaluate with config.evaluate.ood_inputs in 2 processes (``launch/local.sh``, CPU, 2 fake
devices each, joined by jax.distributed) reports the out-of-distribution section of 1 process on
the same 4 devices' layout: each process scores its part of the images, the histogram is summed
over the global batches and the per-image scores gathered in process order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import evaluate, outcomes, train
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env
from tests.test_multihost import _free_port


def _ood_images(folder) -> str:
  """31 inputs: 30 noise and stripe images (none of the digits), then an unreadable file (sorted
  last: in process 1's part of 2)."""
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for i in range(30):
    if i % 2:
      pixels = rng.integers(0, 256, (16, 16, 3), np.uint8)
    else:
      pixels = np.zeros((16, 16, 3), np.uint8)
      pixels[:, i % 16::3] = 255
    Image.fromarray(pixels).save(os.path.join(folder, f'p{i:02d}.png'))
  with open(os.path.join(folder, 'z_broken.png'), 'wb') as f:
    f.write(b'not a png')
  return str(folder)


@pytest.mark.slow
def test_two_processes_report_the_ood_section_of_one(digits_config, tmp_path):
  """2 processes x 2 devices against 1 process x 4 devices at the same global eval batch of 16 (8
  per process: 2 batches each, the second of process 1 short and holding the unreadable file): the
  same per-device programs, so the same scores, and the same OOD figures."""
  digits_config.num_train_steps = 10
  digits_config.eval_batch_size = 16
  digits_config.mesh.num_devices = 4   # 8 fake devices in this process: use 4, as 2 x 2 do
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(digits_config, workdir)   # also prepares the dataset for the children
  ood = _ood_images(tmp_path / 'ood')
  one, two = tmp_path / 'eval_one', tmp_path / 'eval_two'
  flags = {'evaluate.ood_inputs': ood, 'evaluate.label_issues': False, 'evaluate.errors': 0}
  evaluate.evaluate(None, workdir, {**flags, 'evaluate.output_dir': str(one)})
  cmd = ['bash', os.path.join(REPO, 'launch', 'local.sh'), '-n', '2', '--cpu-devices', '2',
         '--port', str(_free_port()), '--timeout', '150', '--python', sys.executable, '--',
         '--mode=evaluate', f'--workdir={workdir}', f'--config.evaluate.output_dir={two}',
         *(f'--config.{k}={v}' for k, v in flags.items())]
  r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                     timeout=180)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
  reports = [json.load(open(d / 'report.json')) for d in (one, two)]
  want, got = (rep.get('out_of_distribution') for rep in reports)
  assert want is not None and (want['inputs'], want['examples'], want['skipped']) == (31, 30, 1)
  assert [d['score'] for d in want['detectors']] == ['msp', 'logsumexp', 'max_logit']
  assert 0 < want['auroc'] < 1 and len({d['auroc'] for d in want['detectors']}) > 1
  assert reports[0]['num_examples'] == reports[1]['num_examples']   # the split, scored alike
  assert got == want
  md = [open(d / 'report.md').read() for d in (one, two)]
  section = [m[m.index('## Out-of-distribution images'):].split('\n## ')[0] for m in md]
  assert section[0] == section[1]


@pytest.mark.parametrize('count, parts', [(31, [(0, 16), (16, 31)]), (1, [(0, 1), (1, 1)])])
def test_each_process_reads_a_contiguous_part_and_all_run_the_largest_parts_batches(
    monkeypatch, count, parts):
  """The parts, concatenated in process order, are the files; a process whose part is short (or
  empty) runs as many batches as the others (masked ones)."""
  files = [f'f{i:02d}.png' for i in range(count)]
  monkeypatch.setattr(outcomes.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(outcomes.sharding, 'gather_rows',
                      lambda cols: {k: np.concatenate([v, v]) for k, v in cols.items()})
  for p, (a, b) in enumerate(parts):
    monkeypatch.setattr(outcomes.jax, 'process_index', lambda p=p: p)
    assert outcomes._file_share(files, 8) == (files[a:b], 2 if count == 31 else 1)


@pytest.mark.parametrize('other, said', [(['a.png'] * 29, '29 files'),
                                         (['b.png'] + ['a.png'] * 30, 'other files')])
def test_processes_listing_other_files_are_told_in_one_sentence(monkeypatch, other, said):
  """Another count, or as many files but others (each process would score a part of its own)."""
  def gather(cols):   # process 0 lists 31 a.png, process 1 ``other``
    theirs = np.asarray([[len(other), zlib.crc32('\n'.join(other).encode())]], np.int64)
    return {'n': np.concatenate([cols['n'], theirs])}
  monkeypatch.setattr(outcomes.sharding, 'gather_rows', gather)
  with pytest.raises(UserError) as info:
    outcomes._file_share(['a.png'] * 31, 8)
  assert str(info.value) == (f'config.evaluate.ood_inputs lists 31 files on process 0 but {said} '
                             'on process 1; put them where every process reads the same files '
                             '(shared storage).')
