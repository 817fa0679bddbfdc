"""What the index reads of each image file (``file_probe``): the header's size and bands, or why the
file cannot be read; many files probed in worker processes that never run the caller's script; a
file that fails to decode after it was indexed is a masked row."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from imgcls_jax.data import file_probe, pipeline
from tests.conftest import subprocess_env
from tests.test_folder_index import _data, _flat, _fresh, _split  # noqa: F401  (_fresh: autouse)


def _assorted(root, n):
  """``n`` files of every kind ``probe`` tells apart (RGB / grey PNG, PGM, JPEG, empty, not an
  image, truncated), names with spaces and accents among them; their ids, with one missing file."""
  ids = []
  for k in range(n):
    rel = f'c{k % 3}/{k:04d}{" é" if k % 7 == 0 else ""}.{("png", "pgm", "jpg")[k % 3]}'
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    kind = k % 10
    if kind == 7:
      open(path, 'wb').close()
    elif kind == 8:
      with open(path, 'w') as f:
        f.write('not an image')
    else:
      img = Image.fromarray(np.full((4 + k % 5, 6 + k % 3, 3), k % 256, np.uint8))
      img.convert('L' if kind in (1, 4) else 'RGB').save(path, format=('PNG', 'PPM', 'JPEG')[k % 3])
      if kind == 9:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) - 12)
    ids.append(rel)
  return ids + ['c0/missing.png']


def test_a_script_without_a_main_guard_is_not_run_again_by_the_probing_workers(tmp_path):
  """Workers spawned by multiprocessing imported the caller's ``__main__``: a script without an
  ``if __name__ == '__main__':`` guard ran again in every worker (and died in multiprocessing's
  bootstrapping check, so the files were probed in one process after all). The workers now run
  no script: the script's top level runs once, no file is opened in it, and the results equal
  one process's, in order."""
  root = str(tmp_path / 'images')
  ids = _assorted(root, 300)
  (tmp_path / 'ids.json').write_text(json.dumps(ids))
  script = tmp_path / 'unguarded.py'
  script.write_text(
      'import json, sys\n'
      'from PIL import Image\n'
      'from imgcls_jax.data import file_probe\n'
      "print('top level of the script', flush=True)\n"
      'opened, real_open = [], Image.open\n'
      'Image.open = lambda *a, **k: opened.append(a) or real_open(*a, **k)\n'
      'file_probe._PARALLEL_FROM = 100\n'
      "ids = json.load(open(sys.argv[1]))\n"
      "got = file_probe.probe_all(sys.argv[2], 'flat', sys.argv[2], '', ids)\n"
      "print(json.dumps({'got': got, 'opened here': len(opened)}))\n")
  run = subprocess.run([sys.executable, str(script), str(tmp_path / 'ids.json'), root],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.count('top level of the script') == 1, run.stdout[-2000:]
  assert 'probing in this one' not in run.stderr
  said = json.loads(run.stdout.splitlines()[-1])
  assert said['opened here'] == 0   # every file was probed in a worker
  here = [file_probe.probe(os.path.join(root, i)) for i in ids[:-1]] + ['file not found']
  assert [g if isinstance(g, str) else tuple(g) for g in said['got']] == here
  assert {type(r) for r in here} == {tuple, str} and len(set(here)) > 10


def test_workers_that_fail_leave_their_files_to_this_process_with_a_warning(tmp_path, monkeypatch,
                                                                           caplog):
  root = str(tmp_path / 'images')
  paths = [os.path.join(root, i) for i in _assorted(root, 40)]
  monkeypatch.setattr(file_probe, '_PARALLEL_FROM', 10)
  monkeypatch.setattr(file_probe, '_CHUNK', 8)
  monkeypatch.setattr(file_probe, '_WORKER', "import sys; sys.exit('no worker here')")
  with caplog.at_level(logging.WARNING):
    got = file_probe._probe_many(paths)
  assert got == [file_probe.probe(p) for p in paths]
  said = [r.getMessage() for r in caplog.records]
  assert len(said) == 1 and said[0].startswith('Probing image headers in ')
  assert said[0].endswith(' processes failed (no worker here); probing in this one.')


def test_a_file_that_fails_to_decode_later_is_a_masked_row_and_the_others_keep_theirs(
    tmp_path, digits_config, caplog):
  root = _flat(str(tmp_path / 'flat'), {'a': 8, 'b': 8})
  data = _data(digits_config, folder=root, holdout_fraction=0.25, cache=False)

  def batches():
    ds, _ = pipeline.train_dataset(data, seed=0, local_batch_size=4)
    return [b for _, b in zip(range(3), ds.as_numpy_iterator())]
  clean = batches()
  assert all(b['mask'].all() for b in clean)
  victim = _split(data, 'train').paths[0]
  with open(victim, 'wb') as f:          # damaged after it was indexed (same process, same index)
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
  with caplog.at_level(logging.WARNING):
    damaged = batches()
  assert f'{victim} is not a readable image' in caplog.text
  masked = [(i, r) for i, b in enumerate(damaged) for r in np.flatnonzero(~b['mask'])]
  assert len(masked) == 1
  for i, (a, b) in enumerate(zip(clean, damaged)):
    np.testing.assert_array_equal(a['label'], b['label'])
    keep = b['mask']
    np.testing.assert_array_equal(a['image'][keep], b['image'][keep])


def test_a_file_this_user_may_not_read_is_named_so_not_as_undecodable(tmp_path, monkeypatch):
  """(Tests run as root, for whom chmod 000 changes nothing: the refusal is simulated.)"""
  path = tmp_path / 'a.png'
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
  assert file_probe.probe(str(path)) == (4, 4, 1)

  def refuse(*args, **kwargs):
    raise PermissionError(13, 'Permission denied')
  monkeypatch.setattr(Image, 'open', refuse)
  assert file_probe.probe(str(path)) == 'cannot be read (Permission denied)'


def test_the_probe_turns_and_reads_a_file_as_decode_does(tmp_path):
  """The header probe's (height, width) is the shape ``images.decode`` gives, for the files whose
  orientation is not a plain EXIF tag: XMP's tiff:Orientation only (JPEG, PNG), an EXIF block PIL
  cannot parse (ignored by decode, which reads the pixels; XMP then decides) and a TIFF's own
  orientation tag; a plain EXIF 6 JPEG and an unturned PNG are the controls."""
  from imgcls_jax.data import images
  xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
         'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
         'tiff:Orientation="{}"/></rdf:RDF></x:xmpmeta>')
  from PIL import PngImagePlugin
  def png_xmp(o):
    info = PngImagePlugin.PngInfo()
    info.add_itxt('XML:com.adobe.xmp', xmp.format(o))
    return info
  exif6 = Image.Exif()
  exif6[0x0112] = 6
  junk = b'Exif\x00\x00not a TIFF block'
  img = Image.fromarray(np.arange(4 * 10 * 3, dtype=np.uint8).reshape(4, 10, 3))
  made = {'xmp 6.jpg': dict(quality=95, xmp=xmp.format(6).encode()),
          'xmp 8.png': dict(pnginfo=png_xmp(8)),
          'damaged exif.png': dict(exif=junk),
          'damaged exif xmp 6.png': dict(exif=junk, pnginfo=png_xmp(6)),
          'damaged exif.jpg': dict(quality=95, dpi=(72, 72), exif=junk),
          'exif 6.tif': dict(exif=exif6),
          'exif 6.jpg': dict(quality=95, exif=exif6),
          'plain.png': {}}
  for name, save in made.items():
    img.save(tmp_path / name, **save)
  for name in made:
    path = str(tmp_path / name)
    h, w, _ = images.decode(path, channels=3).shape
    assert file_probe.probe(path) == (h, w, 3), name
  turned = {n for n in made if file_probe.probe(str(tmp_path / n))[:2] == (10, 4)}
  assert turned == {'xmp 6.jpg', 'xmp 8.png', 'damaged exif xmp 6.png', 'exif 6.tif',
                    'exif 6.jpg'}
