"""--mode=export: SavedModel (uint8 signature), TFLite, int8 TFLite and ONNX agree with JAX (or the
float model, for int8), or the export fails; without the dataset it verifies on what the run
directory holds."""
import errno
import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest

from imgcls_jax import export, inference, run_directory
from imgcls_jax.data import digits, pipeline
from imgcls_jax.errors import UserError
from tests.test_predict import trained_run

# The ONNX checks need the export extra (CI installs it); without it the other formats are tested.
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ('onnx', 'onnxruntime', 'tf2onnx'))
HAVE_LITERT = importlib.util.find_spec('ai_edge_litert') is not None  # else tf.lite runs TFLite


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  config = config.copy_and_resolve_references()
  config.export.verify_examples = 100
  config.export.quantize = 'int8'
  config.export.calibration_examples = 64
  config.export.onnx = HAVE_ONNX
  config.export.output_dir = str(tmp_path_factory.mktemp('export') / 'model')
  record = export.export(config, workdir)
  return config, workdir, record


def _formats(out):
  formats = {'saved_model': lambda x: export.run_saved_model(os.path.join(out, 'saved_model'), x),
             'tflite': lambda x: export.run_tflite(os.path.join(out, 'model.tflite'), x),
             'onnx': lambda x: export.run_onnx(os.path.join(out, 'model.onnx'), x)}
  if not HAVE_ONNX:
    del formats['onnx']
  return formats


def test_onnx_model_has_the_exported_signature(exported):
  """model.onnx takes ``images`` uint8 [batch, 8, 8, 1] (any batch) and returns float
  ``probabilities`` and ``logits`` [batch, 10], the names every other format uses."""
  if not HAVE_ONNX:
    pytest.skip("ONNX export is not tested: pip install 'imgcls_jax[export]' (onnx, onnxruntime, "
                'tf2onnx)')
  import onnx
  config, _, _ = exported
  graph = onnx.load(os.path.join(config.export.output_dir, 'model.onnx')).graph

  def spec(v):
    t = v.type.tensor_type
    return (onnx.TensorProto.DataType.Name(t.elem_type),
            [d.dim_value if d.HasField('dim_value') else None for d in t.shape.dim])
  assert {v.name: spec(v) for v in graph.input} == {'images': ('UINT8', [None, 8, 8, 1])}
  assert {v.name: spec(v) for v in graph.output} == {'probabilities': ('FLOAT', [None, 10]),
                                                     'logits': ('FLOAT', [None, 10])}


def test_export_writes_and_records_its_verification(exported):
  config, _, record = exported
  out = config.export.output_dir
  assert sorted(os.listdir(out)) == sorted(['export.json', 'labels.txt', 'model.tflite',
                                            'model_int8.tflite', 'saved_model'] +
                                           ['model.onnx'] * HAVE_ONNX)
  assert not os.path.exists(out + '.incomplete')
  assert json.load(open(os.path.join(out, 'export.json'))) == record
  assert open(os.path.join(out, 'labels.txt')).read().split() == [str(i) for i in range(10)]
  assert record['input'] == {'name': 'images', 'dtype': 'uint8', 'shape': [None, 8, 8, 1]}
  assert record['tflite_runtime'].startswith('ai_edge_litert' if HAVE_LITERT else 'tf.lite')
  v = record['verification']
  assert v['examples'] == 100 and v['source'] == "the split 'test' of 'sklearn_digits'"
  for fmt in _formats(out):
    assert v[fmt]['max_abs_prob_diff'] <= 1e-4 and v[fmt]['top1_agreement'] == 1.0
  assert record['bytes']['model.tflite'] == os.path.getsize(os.path.join(out, 'model.tflite'))


def test_exported_models_match_jax_on_new_inputs(exported):
  """Independent of the built-in check: other images, batch sizes 1 and 7, every float format
  (ONNX under onnxruntime within 1e-4 of JAX's probabilities, as the issue asks)."""
  config, workdir, _ = exported
  clf = inference.classifier(inference.load(workdir, config))
  rng = np.random.default_rng(0)
  for n in (1, 7):
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    want = clf.predict_arrays(images)
    for fmt, run in _formats(config.export.output_dir).items():
      got = run(images)
      assert got['probabilities'].shape == (n, 10), fmt
      np.testing.assert_allclose(got['probabilities'], want['probabilities'], atol=1e-5)
      np.testing.assert_allclose(got['logits'], want['logits'], atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(got['probabilities'].sum(-1), 1.0, atol=1e-5)


def test_export_json_says_how_predict_makes_the_pixels(exported):
  """export.json said 'preprocessing_before_input': 'none' although predict turns a photo
  upright, converts it to grey and resizes it with Pillow's box filter. Now it gives those
  steps; Pillow called directly as they say (an oracle beside predict's code) gives predict's
  pixels for EXIF-rotated photos larger than the model input, and the exported model its
  answers, where a bilinear resize gives other pixels."""
  import io
  from PIL import Image, ImageOps
  config, workdir, record = exported
  recipe = record['preprocessing_before_input']
  assert recipe['resize_to'] == [8, 8] and recipe['ops'] is None
  assert recipe['color'].startswith("'L'") and 'BOX' in recipe['resize']
  assert 'EXIF orientation applied' in recipe['decode']
  clf = inference.classifier(inference.load(workdir, config))
  x, _ = digits.load_arrays('test')
  files, ours, bilinear = [], [], []
  for i, orientation in enumerate((1, 3, 6, 8)):
    big = Image.fromarray(x[i, :, :, 0]).resize((40, 40), Image.Resampling.BICUBIC).convert('RGB')
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    big.save(buf, 'PNG', exif=exif)
    files.append(buf.getvalue())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(files[-1]))).convert('L')
    ours.append(np.asarray(upright.resize((8, 8), Image.Resampling.BOX))[..., None])
    bilinear.append(np.asarray(upright.resize((8, 8), Image.Resampling.BILINEAR))[..., None])
  got = np.stack([clf.prepare(f) for f in files])
  np.testing.assert_array_equal(got, np.stack(ours))
  assert np.abs(got.astype(int) - np.stack(bilinear)).max() > 0   # the filter matters
  # An arrays file written from tfds records '' as its ops: decoded to the fixed size all the same.
  import dataclasses
  trained = clf.trained
  arrays_run = dataclasses.replace(trained, info=dataclasses.replace(trained.info,
                                                                     stored_preprocess=''))
  assert inference.pixel_recipe(arrays_run)['resize_to'] == [8, 8]
  np.testing.assert_array_equal(inference.prepare(arrays_run, files[0]), ours[0])
  onnx_or_saved = _formats(config.export.output_dir).get('onnx') or _formats(
      config.export.output_dir)['saved_model']
  np.testing.assert_array_equal(onnx_or_saved(np.stack(ours))['probabilities'].argmax(-1),
                                clf.predict_arrays(got)['probabilities'].argmax(-1))


def test_export_fails_and_writes_nothing_when_outputs_disagree(exported, monkeypatch, tmp_path):
  config, workdir, _ = exported
  config = config.copy_and_resolve_references()
  config.export.output_dir = str(tmp_path / 'bad')
  config.export.tflite = config.export.onnx = False
  config.export.quantize = ''
  config.export.verify_examples = 16
  real = export.run_saved_model

  def off_by_a_little(directory, images, batch=64):
    out = real(directory, images, batch)
    out['probabilities'] = out['probabilities'] + 1e-3   # e.g. a wrong normalisation constant
    return out
  monkeypatch.setattr(export, 'run_saved_model', off_by_a_little)
  with pytest.raises(export.ExportMismatch,
                     match=r'saved_model disagrees .* 1\.00e-03 > tolerance'):
    export.export(config, workdir)
  assert not os.path.exists(config.export.output_dir)
  assert not os.path.exists(config.export.output_dir + '.incomplete')


def test_exported_models_reproduce_the_trainers_accuracy(exported, tmp_path_factory, tfds_dir):
  """Independent oracle: the run's own final evaluation. Every float format, on every test image,
  must give exactly the accuracy the trainer measured on that split."""
  config, _, _ = exported
  _, _, final = trained_run(tmp_path_factory, tfds_dir)
  x, y = digits.load_arrays('test')
  for fmt, run in _formats(config.export.output_dir).items():
    accuracy = float(np.mean(run(x)['probabilities'].argmax(-1) == y))
    assert len(y) == final['count']
    assert accuracy == pytest.approx(final['accuracy'], abs=1e-9), fmt


def test_int8_model_is_quantized_and_its_report_is_right(exported):
  """The int8 file really computes in int8 (its conv / dense kernels take int8 weights), runs
  under the standalone LiteRT runtime, and the agreement and accuracy recorded in export.json
  are what an independent run over the whole test split gives."""
  litert = pytest.importorskip('ai_edge_litert.interpreter',
                               reason="needs the standalone LiteRT runtime: pip install "
                               "'imgcls_jax[export]'")
  Interpreter = litert.Interpreter
  config, workdir, record = exported
  path = os.path.join(config.export.output_dir, 'model_int8.tflite')
  interpreter = Interpreter(model_path=path)
  tensors = {t['index']: t for t in interpreter.get_tensor_details()}
  kernels = [op for op in interpreter._get_ops_details()
             if op['op_name'] in ('CONV_2D', 'DEPTHWISE_CONV_2D', 'FULLY_CONNECTED')]
  assert kernels
  for op in kernels:
    assert tensors[op['inputs'][1]]['dtype'] == np.int8, (op['op_name'], tensors[op['inputs'][1]])
  runner = interpreter.get_signature_runner('serving_default')
  x, y = digits.load_arrays('test')
  got = np.concatenate([runner(images=x[i:i + 1])['probabilities'] for i in range(len(x))])
  float_probs = inference.classifier(inference.load(workdir, config)).predict_arrays(x)[
      'probabilities']
  q = record['verification']['quantized']
  assert q['examples'] == len(x) and q['source'] == "the split 'test' of 'sklearn_digits'"
  assert q['top1_agreement'] == pytest.approx(np.mean(got.argmax(-1) == float_probs.argmax(-1)))
  assert q['quantized_accuracy'] == pytest.approx(np.mean(got.argmax(-1) == y))
  assert q['float_accuracy'] == pytest.approx(np.mean(float_probs.argmax(-1) == y))
  assert q['accuracy_drop'] <= config.export.max_accuracy_drop
  # Probabilities, not just a ranking: they sum to 1 (the int8 softmax's output step is 1/256)
  # and stay near the float model's. The StableHLO softmax quantised to sums up to 2.04.
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=0.02)
  assert np.abs(got - float_probs).max() < 0.1
  assert q['max_abs_prob_diff'] == pytest.approx(np.abs(got - float_probs).max(), abs=1e-6)
  assert record['quantization'] == {'quantize': 'int8', 'calibration_examples': 64,
                                    'calibration_source': "the split 'train' of 'sklearn_digits'"}
  sizes = record['bytes']
  print(f"int8 {sizes['model_int8.tflite']} B vs float {sizes['model.tflite']} B; agreement "
        f"{q['top1_agreement']:.4f}, accuracy {q['float_accuracy']:.4f} -> "
        f"{q['quantized_accuracy']:.4f}")


def _ops(path):
  from collections import Counter
  ops = export.formats._tflite_interpreter(path)._get_ops_details()
  return Counter(op['op_name'] for op in ops)


def test_tflite_models_take_one_image_and_have_batchnorm_folded(exported, tmp_path):
  """By default (config.export.tflite_batch=1) both TFLite models are traced at batch 1, so the
  converter folds each BatchNorm into its convolution: no BROADCAST_TO / SHAPE arithmetic, and
  no SUB / MUL / ADD beyond the input normalisation. tflite_batch=0 keeps any batch (and those
  ops); both agree with JAX; a bad value is one sentence."""
  config, workdir, record = exported
  out = config.export.output_dir
  assert record['tflite_input_shape'] == [1, 8, 8, 1]
  dynamic = export.export(_small(config, tmp_path, tflite=True, tflite_batch=0), workdir)
  assert dynamic['tflite_input_shape'] == [None, 8, 8, 1]
  fixed_ops, any_ops = _ops(os.path.join(out, 'model.tflite')), _ops(
      os.path.join(tmp_path, 'model', 'model.tflite'))
  int8_ops = _ops(os.path.join(out, 'model_int8.tflite'))
  for ops in (fixed_ops, int8_ops):
    assert ops['BROADCAST_TO'] == ops['SHAPE'] == 0, ops
    assert ops['SUB'] + ops['MUL'] + ops['ADD'] + ops['DIV'] <= 2, ops   # (x - mean) / std
  assert any_ops['BROADCAST_TO'] > 0 and any_ops['MUL'] + any_ops['ADD'] > 2, any_ops
  x, _ = digits.load_arrays('test')
  reference = inference.classifier(inference.load(workdir, config)).predict_arrays(x[:23])
  for path, batch in ((os.path.join(out, 'model.tflite'), 1),
                      (os.path.join(tmp_path, 'model', 'model.tflite'), 0)):
    assert export.formats.tflite_batch(path) == batch
    got = export.run_tflite(path, x[:23], batch=7)                       # 23 = 3 x 7 + 2
    assert export.compare(reference, got)['max_abs_prob_diff'] < 1e-4
  with pytest.raises(UserError, match=r'^config.export.tflite_batch must be an integer >= 0'):
    export.export(_small(config, tmp_path / 'bad', tflite_batch=-1), workdir)


def _small(config, tmp_path, **changes):
  config = config.copy_and_resolve_references()
  config.export.output_dir = str(tmp_path / 'model')
  config.export.tflite = config.export.onnx = False
  config.export.quantize = ''
  config.export.verify_examples = 32
  config.export.calibration_examples = 32
  for k, v in changes.items():
    config.export[k] = v
  return config


def test_export_never_replaces_a_folder_that_is_not_an_earlier_export(exported, tmp_path,
                                                                      monkeypatch):
  """The export replaces its output folder as a whole: pointed at the run directory, a folder
  above it, a folder of other files or a file, it stops before any work, and deletes nothing
  (it used to delete the run's checkpoints with export.output_dir=<workdir>)."""
  config, workdir, _ = exported
  precious = tmp_path / 'precious'
  precious.mkdir()
  (precious / 'notes.txt').write_text('keep me')
  a_file = tmp_path / 'a_file'
  a_file.write_text('keep me too')
  before = sorted(os.listdir(workdir))
  for target, match in ((workdir, 'holds the run directory'),
                        (os.path.dirname(workdir), 'holds the run directory'),
                        (str(precious), r'holds files that are not an export \(no export.json\)'),
                        (str(a_file), 'is a file')):
    c = _small(config, tmp_path)
    c.export.output_dir = target
    with pytest.raises(UserError, match=match):
      export.export(c, workdir)
  assert sorted(os.listdir(workdir)) == before
  assert (precious / 'notes.txt').read_text() == 'keep me' and a_file.read_text() == 'keep me too'
  # An earlier export is replaced, as before.
  c = _small(config, tmp_path / 'again')
  export.export(c, workdir)
  export.export(c, workdir)
  assert os.path.isfile(os.path.join(c.export.output_dir, 'export.json'))
  # ... unless files were added to it since: they are named and kept (were deleted).
  out = c.export.output_dir
  os.makedirs(os.path.join(out, 'deploy'))
  with open(os.path.join(out, 'deploy', 'app.py'), 'w') as f:
    f.write('keep me')
  before = sorted(os.listdir(out))
  with pytest.raises(UserError, match=r'is an earlier export that also holds files an export does '
                                      r'not write \(deploy\), which replacing it would delete'):
    export.export(c, workdir)
  assert sorted(os.listdir(out)) == before
  assert open(os.path.join(out, 'deploy', 'app.py')).read() == 'keep me'
  # A folder that cannot be moved (a mount point: EBUSY) fails before the work, not after it.
  import errno
  import shutil
  shutil.rmtree(os.path.join(out, 'deploy'))

  def busy(src, dst):
    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src)
  monkeypatch.setattr(os, 'rename', busy)
  with pytest.raises(UserError, match=r'cannot be replaced \(Device or resource busy; e\.g\. a '
                                      r'mount point or a read-only folder\)'):
    export.export(c, workdir)
  monkeypatch.undo()
  assert not os.path.exists(out + '.incomplete')
  # A link to an export is named with the folder to give instead; a sibling '<out>.probe' is not
  # touched (the probe's name is unique).
  os.makedirs(out + '.probe')
  with open(os.path.join(out + '.probe', 'keep.txt'), 'w') as f:
    f.write('keep me')
  export.export(c, workdir)
  assert open(os.path.join(out + '.probe', 'keep.txt')).read() == 'keep me'
  os.symlink(out, out + '.link')
  c.export.output_dir = out + '.link'
  with pytest.raises(UserError, match=r'is a symbolic link; set it to the folder it points at '
                                      rf'\({re.escape(os.path.realpath(out))}\)'):
    export.export(c, workdir)


def test_export_stages_beside_its_folder_without_touching_the_users_files(exported, tmp_path,
                                                                         monkeypatch):
  """The export writes into ``<out>.incomplete`` and renames it at the end. A user's folder of
  that name is refused before any work (it was deleted); one left by a killed export is cleaned
  up; a failure in the final swap leaves the earlier export in place (it had been deleted
  first)."""
  config, workdir, _ = exported
  c = _small(config, tmp_path)
  out = c.export.output_dir
  users = out + '.incomplete'
  os.makedirs(users)
  with open(os.path.join(users, 'keep.txt'), 'w') as f:
    f.write('keep me')
  with pytest.raises(UserError, match=r'model\.incomplete exists and holds no mark of an '
                                      r'export'):
    export.export(c, workdir)
  assert open(os.path.join(users, 'keep.txt')).read() == 'keep me'
  assert not os.path.exists(out)
  os.rename(users, str(tmp_path / 'moved'))
  # A staging folder a killed export left (marked) is removed, and the export goes on.
  real_write = export._write_and_verify

  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(export, '_write_and_verify', killed)
  monkeypatch.setattr(shutil, 'rmtree', lambda *a, **k: None)   # as after a kill -9
  with pytest.raises(KeyboardInterrupt):
    export.export(c, workdir)
  monkeypatch.undo()
  assert os.path.isfile(os.path.join(users, export.output_dir.STAGING_MARK))
  export.export(c, workdir)
  assert not os.path.exists(users)
  assert '.imgcls_jax_export_staging' not in os.listdir(out)
  first = json.load(open(os.path.join(out, 'export.json')))
  assert export.output_dir.STAGING_MARK not in first['files']
  # The swap: when the new folder cannot move in, the earlier export is put back whole.
  real_rename = os.rename

  def staging_stuck(src, dst):
    if src.endswith('.incomplete'):
      raise OSError(errno.EACCES, os.strerror(errno.EACCES), src)
    real_rename(src, dst)
  monkeypatch.setattr(os, 'rename', staging_stuck)
  monkeypatch.setattr(export, '_write_and_verify', real_write)
  with pytest.raises(OSError):
    export.export(c, workdir)
  monkeypatch.undo()
  assert json.load(open(os.path.join(out, 'export.json'))) == first
  assert sorted(os.listdir(tmp_path)) == ['model', 'model.incomplete', 'moved']
  export.export(c, workdir)   # the staging folder left behind is still marked as the export's
  assert sorted(os.listdir(tmp_path)) == ['model', 'moved']
  # Killed between the swap's two renames: the earlier export, moved aside, is put back.
  os.rename(out, out + '.replaced-0123')
  export.export(c, workdir)
  assert sorted(os.listdir(tmp_path)) == ['model', 'moved']


@pytest.mark.parametrize('key, value, match', [
    ('dtype', 'int8', r"config.export.dtype must be '' \(the run's\) or one of float32"),
    ('tolerance', -1.0, r'config.export.tolerance=-1.0 must be > 0')])
def test_bad_export_settings_are_one_sentence_before_any_work(exported, tmp_path, key, value,
                                                              match):
  config, workdir, _ = exported
  with pytest.raises(UserError, match=match):
    export.export(_small(config, tmp_path, **{key: value}), workdir)
  assert not os.path.exists(tmp_path / 'model')


def test_export_fails_when_quantization_loses_too_much(exported, tmp_path):
  """A limit no model can meet (accuracy must rise by 2 points) fails the export, writing
  nothing."""
  config, workdir, _ = exported
  config = _small(config, tmp_path, quantize='int8', max_accuracy_drop=-0.02)
  with pytest.raises(export.QuantizationTooLossy, match=r'points below .*max_accuracy_drop'):
    export.export(config, workdir)
  assert not os.path.exists(config.export.output_dir)
  assert not os.path.exists(config.export.output_dir + '.incomplete')


def _data_gone(monkeypatch):
  """The dataset is deleted: reading any split fails as the data sources do."""
  def unreadable(data, split, **kwargs):
    raise UserError(f"The dataset '{data.name}' was not found in {data.data_dir}; prepare it.")
  monkeypatch.setattr(pipeline, 'EvalData', unreadable)


def test_export_without_the_dataset_uses_samples_stored_in_the_run(exported, monkeypatch,
                                                                   tmp_path, capsys):
  config, workdir, _ = exported
  _data_gone(monkeypatch)
  x, y = digits.load_arrays('test')
  xt, yt = digits.load_arrays('train')
  stored = {'eval_images': x[:40], 'eval_labels': y[:40], 'train_images': xt[:48],
            'train_labels': yt[:48]}
  monkeypatch.setattr(run_directory, 'read_samples',
                      lambda wd: stored if wd == workdir else None)
  config = _small(config, tmp_path, quantize='int8', max_accuracy_drop=1.0)
  record = export.export(config, workdir)
  v = record['verification']
  assert v['examples'] == 32 and v['source'].startswith('40 eval images stored in the run')
  assert v['quantized']['examples'] == 40 and 'accuracy_drop' in v['quantized']
  assert record['quantization']['calibration_source'] == '48 train images stored in the run directory'
  assert record['quantization']['calibration_examples'] == 32
  assert '40 eval images stored in the run directory' in capsys.readouterr().out


def test_export_without_dataset_or_samples_verifies_on_synthetic_images(exported, monkeypatch,
                                                                        tmp_path, capsys):
  config, workdir, _ = exported
  _data_gone(monkeypatch)
  monkeypatch.setattr(run_directory, 'read_samples', lambda wd: None)
  record = export.export(_small(config, tmp_path, tflite=True), workdir)
  v = record['verification']
  assert v['examples'] == 32 and v['source'].startswith('32 synthetic images (seed 0')
  assert v['tflite']['max_abs_prob_diff'] <= 1e-4
  assert 'synthetic images' in capsys.readouterr().out
  # int8 needs real training images: one sentence naming the fix, nothing written.
  config = _small(config, tmp_path / 'q', quantize='int8')
  with pytest.raises(UserError) as e:
    export.export(config, workdir)
  message = str(e.value)
  assert message.startswith('int8 quantisation needs training images') and '\n' not in message
  assert "--config.export.quantize=float16" in message
  assert not os.path.exists(config.export.output_dir)


def test_a_format_its_runtime_cannot_run_is_a_one_line_mismatch():
  """E.g. onnxruntime refusing a Reshape that tf2onnx computed wrongly (seen on the default
  digits CNN): an ExportMismatch naming the format and the flag that skips it."""
  def broken(path, images, batch=64):
    raise RuntimeError('[ONNXRuntimeError] : 1 : FAIL : Non-zero status code\nReshape: the '
                       'input tensor cannot be reshaped to the requested shape')
  reference = {'probabilities': np.zeros((8, 10)), 'logits': np.zeros((8, 10))}
  with pytest.raises(export.ExportMismatch) as e:
    export._check(broken, 'model.onnx', np.zeros((8, 8, 8, 1), np.uint8), reference, 'onnx')
  message = str(e.value)
  assert message.startswith('The exported onnx fails under its runtime (RuntimeError: Reshape')
  assert message.endswith('--config.export.onnx=False.') and '\n' not in message


def test_probe_tells_a_model_that_runs_from_one_that_does_not(exported, tmp_path):
  """The quantised model is first run in a child process, since a runtime abort (seen with
  ResNet-18 int8 under LiteRT 2.3) would end the exporter without a message."""
  config, _, _ = exported
  assert export.probe_tflite(os.path.join(config.export.output_dir, 'model_int8.tflite'),
                             (8, 8, 1)) == ''
  bad = tmp_path / 'bad.tflite'
  bad.write_bytes(b'not a flatbuffer')
  failure = export.probe_tflite(str(bad), (8, 8, 1))
  assert failure.startswith('exit status 1: ') and 'ValueError' in failure
