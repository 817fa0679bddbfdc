"""The run directory is the whole model: after training, the data can go away and evaluate (on
another folder), predict, export and serve still work from --workdir alone, through the CLI, as a
new user would type them. Also: an EXIF-rotated photo is predicted exactly as the upright one."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import digits, images
from tests.conftest import REPO, main_run_here, subprocess_env

NAMES = ('zero', 'one', 'two')
ORIENTATION = 0x0112


def _cli(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.main', *args], capture_output=True,
                        text=True, env=subprocess_env(1), cwd=REPO, timeout=timeout)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _train_here(monkeypatch, capsys, *args):
  """The training command in this process (``main_run_here``), on one device as a child has."""
  return main_run_here(monkeypatch, capsys, *args, '--config.mesh.num_devices=1')


def _write_digit(path, pixels_8x8, k):
  """A digit scaled to a random size in one of several modes and formats (as users' photos are)."""
  size = 16 + (k * 7) % 17
  img = Image.fromarray(pixels_8x8[..., 0]).resize((size, size + k % 3), Image.Resampling.BILINEAR)
  mode, fmt = [('RGB', 'JPEG'), ('L', 'PNG'), ('RGBA', 'PNG'), ('P', 'GIF'), ('RGB', 'WEBP'),
               ('L', 'TIFF')][k % 6]
  ext = {'JPEG': '.jpg', 'PNG': '.png', 'GIF': '.gif', 'WEBP': '.webp', 'TIFF': '.TIF'}[fmt]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.convert(mode).save(path + ext, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return path + ext


def _folder(root, split, per_class, classes=NAMES):
  x, y = digits.load_arrays(split)
  for c in classes:
    digit = NAMES.index(c)
    for k, i in enumerate(np.flatnonzero(y == digit)[:per_class]):
      _write_digit(f'{root}/{c}/{split}_{k}', x[i], k)
  return root


def _serve_one_request(workdir, image_path):
  proc = subprocess.Popen([sys.executable, '-m', 'imgcls_jax.main', '--mode=serve',
                           f'--workdir={workdir}', '--config.serve.port=0'],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=subprocess_env(1), cwd=REPO)
  try:
    line, deadline = '', time.monotonic() + 240
    while 'Serving' not in line and time.monotonic() < deadline and proc.poll() is None:
      line = proc.stdout.readline()
    url = re.search(r'(http://127\.0\.0\.1:\d+)', line)
    assert url, (line, proc.poll(), proc.stderr.read()[-2000:] if proc.poll() is not None else '')
    with open(image_path, 'rb') as f:
      req = urllib.request.Request(f'{url.group(1)}/v1/classify?top_k=1', data=f.read(),
                                   method='POST')
    with urllib.request.urlopen(req, timeout=60) as r:
      answer = json.load(r)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    return answer
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _predict(workdir, inputs, out):
  _ok(_cli('--mode=predict', f'--workdir={workdir}', f'--config.predict.inputs={inputs}',
           f'--config.predict.output={out}', '--config.predict.top_k=1'))
  with open(out) as f:
    return [json.loads(line) for line in f]


def _export(workdir):
  proc = _ok(_cli('--mode=export', f'--workdir={workdir}', '--config.export.verify_examples=32'))
  with open(os.path.join(workdir, 'export', 'export.json')) as f:
    record = json.load(f)
  assert record['verification']['tflite']['top1_agreement'] == 1.0
  return proc, record


@pytest.mark.slow
def test_image_folder_run_needs_only_its_workdir(tmp_path, monkeypatch, capsys):
  photos = _folder(str(tmp_path / 'photos'), 'train', 30)
  with open(f'{photos}/one/broken.jpg', 'wb') as f:   # a truncated JPEG and a text file
    f.write(open(next(f'{photos}/zero/{n}' for n in sorted(os.listdir(f'{photos}/zero'))
                      if n.endswith('.jpg')), 'rb').read()[:300])
  with open(f'{photos}/two/notes.txt', 'w') as f:
    f.write('not an image\n')
  workdir = str(tmp_path / 'run')
  trained = _ok(_train_here(
      monkeypatch, capsys, f'--config={REPO}/configs/default.py', f'--workdir={workdir}',
      '--config.data.name=image_folder', f'--config.data.folder={photos}',
      '--config.data.holdout_fraction=0.2', "--config.data.train_preprocess="
      "random_resized_crop(size=16, area_min=0.8)", '--config.data.device_preprocess=',
      '--config.data.eval_preprocess=resize(size=16)', '--config.data.mean=(0.5,0.5,0.5)',
      '--config.data.std=(0.5,0.5,0.5)', '--config.model.widths=(16,32)', '--config.batch_size=24',
      '--config.num_train_steps=80', '--config.eval_every_steps=-1', '--config.progress_bar=False'))
  assert "split 'train': 72 images in 3 classes: one 24, two 24, zero 24." in trained.stderr
  assert "split 'test': 18 images in 3 classes: one 6, two 6, zero 6." in trained.stderr
  assert 'skipped 2 file(s)' in trained.stderr and 'one/broken.jpg' in trained.stderr
  assert 'Final eval on test (18 examples)' in trained.stdout
  assert 'top-5' not in trained.stdout   # 3 classes: every example's top-5 holds its label
  shutil.move(photos, str(tmp_path / 'moved_away'))

  # Evaluate on a second folder (two of the three classes, new images) given on the command line.
  second = _folder(str(tmp_path / 'second'), 'test', 12, classes=('two', 'zero'))
  ev = _ok(_cli('--mode=evaluate', f'--workdir={workdir}', f'--config.data.folder={second}'))
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  assert report['context']['split'] == 'all' and report['num_examples'] == 24, ev.stdout
  assert report['context']['dataset'] == f'image_folder:{second}'
  assert report['class_names'] == sorted(NAMES)
  # The predictions of --mode=predict on the same files give the same accuracy.
  predictions = _predict(workdir, second, str(tmp_path / 'p.jsonl'))
  assert len(predictions) == 24
  truth = [os.path.basename(os.path.dirname(p['file'])) for p in predictions]
  top1 = [p['predictions'][0]['class'] for p in predictions]
  assert set(top1) <= set(NAMES)
  assert np.mean(np.equal(truth, top1)) == pytest.approx(report['accuracy'], abs=1.5 / 24)
  assert report['accuracy'] > 0.6

  proc, record = _export(workdir)   # the training data is gone: checked on the stored samples
  assert record['class_names'] == sorted(NAMES)
  some_file = os.path.join(second, 'two', sorted(os.listdir(os.path.join(second, 'two')))[0])
  answer = _serve_one_request(workdir, some_file)
  assert answer['predictions'][0]['class'] in NAMES


@pytest.mark.slow
def test_tfds_run_needs_only_its_workdir_after_data_dir_is_deleted(tmp_path, monkeypatch,
                                                                    capsys):
  data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'run')
  _ok(_train_here(monkeypatch, capsys, f'--config={REPO}/configs/default.py',
                  f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                  '--config.model.widths=(16,32)', '--config.num_train_steps=60',
                  '--config.progress_bar=False', '--config.data.name=sklearn_digits',
                  '--config.data.train_preprocess=pad_crop(pad=1)',
                  '--config.data.device_preprocess='))   # default.tfds_digits: the tfds builder
  assert os.path.isdir(os.path.join(data_dir, 'sklearn_digits'))
  shutil.rmtree(data_dir)
  x, y = digits.load_arrays('test')
  pngs = str(tmp_path / 'pngs')
  os.makedirs(pngs)
  for i in range(20):
    Image.fromarray(x[i, :, :, 0]).save(f'{pngs}/{i:02d}_{y[i]}.png')
  predictions = _predict(workdir, pngs, str(tmp_path / 'p.jsonl'))
  assert [p['predictions'][0]['class'] for p in predictions][:1] and len(predictions) == 20
  assert np.mean([p['predictions'][0]['class'] == p['file'][-5] for p in predictions]) > 0.7
  _export(workdir)
  # (Serve loads the run as predict does, inference.load: the image-folder test above serves.)


def test_an_exif_rotated_photo_decodes_and_predicts_as_the_upright_one(tmp_path, tmp_path_factory,
                                                                      tfds_dir):
  from imgcls_jax import inference
  from tests.test_predict import trained_run  # a digits model trained once per session
  rng = np.random.RandomState(0)
  upright = rng.randint(0, 256, (30, 20, 3)).astype(np.uint8)   # portrait: 30 high, 20 wide
  Image.fromarray(upright).save(tmp_path / 'upright.png')
  # As a phone stores it: the sensor's landscape pixels, and an EXIF tag saying "rotate 90 CW".
  exif = Image.Exif()
  exif[ORIENTATION] = 6
  Image.fromarray(np.rot90(upright, 1).copy()).save(tmp_path / 'phone.png', exif=exif)
  for channels in (1, 3):
    a = images.decode(str(tmp_path / 'upright.png'), channels=channels)
    b = images.decode(str(tmp_path / 'phone.png'), channels=channels)
    np.testing.assert_array_equal(a, b)
  assert images.decode(str(tmp_path / 'phone.png'), channels=3).shape == (30, 20, 3)
  from imgcls_jax.data import file_probe
  assert file_probe.probe(str(tmp_path / 'phone.png'))[:2] == (30, 20)  # the index sees it upright
  _, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  clf = inference.classifier(inference.load(workdir))
  batch = np.stack([clf.prepare(str(tmp_path / name)) for name in ('upright.png', 'phone.png')])
  np.testing.assert_array_equal(batch[0], batch[1])   # the model sees the same pixels
  probs = clf.predict_arrays(batch)['probabilities']
  # Two rows of one batch may round differently in the last bit (XLA:CPU's kernels on an AVX2
  # EPYC differed by 1 ulp, 3e-8, between rows 0 and 1): equal up to a few float32 ulps.
  np.testing.assert_allclose(probs[0], probs[1], rtol=8 * np.finfo(np.float32).eps, atol=0)
  rotated_only = clf.prepare(_png_bytes(np.rot90(upright, 1).copy()))
  assert not np.array_equal(rotated_only, batch[0])   # without the tag it is another image


def _png_bytes(pixels):
  import io
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


def test_a_workdir_of_another_kind_is_refused_before_it_is_written(tmp_path, monkeypatch,
                                                                  capsys):
  """Training into a sweep, a cross-validation, a classical baseline or an export, a classical
  baseline into a run or a cross-validation, or a run inside another run's checkpoints/: each
  mixed its files with (or overwrote) the other's. One line each; like kinds and new folders are
  fine."""
  from imgcls_jax import run_directory
  from imgcls_jax.errors import UserError

  def make(name, *files):
    for f in files:
      path = tmp_path / name / f
      path.parent.mkdir(parents=True, exist_ok=True)
      if not f.endswith('/'):
        path.write_text('{}')
    return str(tmp_path / name)
  run = make('run', 'config.json', 'checkpoints/10/x')
  cv = make('cv', 'cv_report.json', 'fold_0/config.json', 'fold_1/checkpoints/')
  ccv = make('ccv', 'cv_report.json', 'fold_0/classical.json')
  classical = make('classical', 'classical.json', 'report.json')
  sweep = make('sweep', 'sweep.json', 'lr=0.1/sweep_trial.json')
  export = make('export', 'export.json', 'model.tflite')
  kinds = {p: run_directory.kind(p) for p in (run, cv, ccv, classical, sweep, export)}
  assert list(kinds.values()) == ['run', 'cross_validation', 'classical_cv', 'classical',
                                  'sweep', 'export']
  for mode in ('train', 'cross_validation', 'classical', 'classical_cv'):
    for path, found in kinds.items():
      if found == {'train': 'run'}.get(mode, mode):
        run_directory.check_writable_by(mode, path)
      else:
        with pytest.raises(UserError, match=r'holds an? .*, which this .* would mix with or '
                                            r'overwrite; give a new --workdir\.'):
          run_directory.check_writable_by(mode, path)
    run_directory.check_writable_by(mode, str(tmp_path / 'new'))
    run_directory.check_writable_by(mode, make('other files', 'notes.txt'))
  with pytest.raises(UserError, match=r'is inside the run directory .*run, which it would mix '
                                      r'with'):
    run_directory.check_writable_by('train', os.path.join(run, 'checkpoints'))
  # Through the command line's entry point (``python -m imgcls_jax.main`` is
  # ``sys.exit(main.run())``; in this process: a child paid ~4 s of imports): nothing of the sweep
  # is touched.
  before = sorted(os.listdir(sweep))
  proc = main_run_here(monkeypatch, capsys, '--config=configs/default.py', f'--workdir={sweep}')
  status, err = proc.returncode, proc.stderr
  assert status == 2 and 'holds a sweep (trial folders, sweep.json), which this training run ' \
      'would mix with' in err, err[-2000:]
  assert sorted(os.listdir(sweep)) == before


def test_classical_mode_with_a_sweep_grid_is_one_line(tmp_path, monkeypatch, capsys):
  proc = main_run_here(monkeypatch, capsys, '--mode=classical',
                       '--config=configs/digits_classical.py', f'--workdir={tmp_path / "c"}',
                       "--config.sweep.grid={'classical.C': [0.1, 1.0]}")
  status, err = proc.returncode, proc.stderr
  assert status == 2, err[-2000:]
  assert [l for l in err.splitlines() if l.startswith('error:')] == [
      'error: --mode=classical fits one model and does not sweep: config.sweep.grid is for trained '
      'runs; drop it, or run one --mode=classical per value (each with its own --workdir).']
  assert not os.path.exists(tmp_path / 'c')
