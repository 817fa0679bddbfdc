"""A run trained with a relative ``--config.data.folder`` keeps working from another directory.

The run's config.json stored the folder as written (``photos``): evaluated from elsewhere, it
failed, or read that directory's own ``photos`` folder with only a "folder changed" warning. The
folder is now stored as an absolute path.
"""
import json
import os
import subprocess
import sys

from tests.conftest import REPO, subprocess_env
from tests.test_classical import digits_folder


def _cli(cwd, *args):
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.main', *args], cwd=cwd,
                        env={**subprocess_env(1), 'PYTHONPATH': REPO}, capture_output=True,
                        text=True, timeout=300)


def test_a_relative_data_folder_is_stored_absolute_and_evaluates_from_elsewhere(tmp_path):
  here, elsewhere = tmp_path / 'here', tmp_path / 'elsewhere'
  here.mkdir()
  elsewhere.mkdir()
  digits_folder(str(here / 'photos'), bad_file=False)
  digits_folder(str(elsewhere / 'photos'), classes=(0, 1, 7), per_class=(2, 2), bad_file=False)
  workdir = str(tmp_path / 'run')
  r = _cli(here, f'--config={REPO}/configs/default.py', f'--workdir={workdir}',
           '--config.data.name=image_folder', '--config.data.folder=photos',
           '--config.data.index_cache=cache',
           '--config.model.widths=(8,)', '--config.batch_size=12', '--config.num_train_steps=4',
           '--config.eval_every_steps=-1', '--config.progress_bar=False')
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)['data']
  assert saved['folder'] == str(here / 'photos') and saved['index_cache'] == str(here / 'cache')
  r = _cli(elsewhere, '--mode=evaluate', f'--workdir={workdir}')   # its own photos/ is another
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  assert report['num_examples'] == 18                    # the run's 3 x 6 test images, not 3 x 2
  assert report['context']['dataset'] == f"image_folder:{here / 'photos'}"
