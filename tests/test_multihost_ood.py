"""--mode=evaluate with config.evaluate.ood_inputs in several processes: each process scores a
contiguous part of the images (all run as many batches), and processes that list other files are
told so in one sentence. The end-to-end check, 2 processes (``launch/local.sh``, CPU, 2 fake devices
each, joined by jax.distributed) reporting the out-of-distribution section of 1 process on the same
4 devices' layout, is ``test_two_processes_report_the_ood_section_of_one`` in
tests/test_multihost.py: it evaluates that file's 2-process run (one trained run for both files'
checks: the children's start-up and compiles are most of their cost).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from imgcls_jax import outcomes
from imgcls_jax.errors import UserError


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
