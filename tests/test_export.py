"""--mode=export: SavedModel (uint8 signature) and TFLite agree with JAX, or the export fails."""
import json
import os

import numpy as np
import pytest

from imgcls_jax import export, inference
from imgcls_jax.data import digits
from tests.test_predict import trained_run


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  config = config.copy_and_resolve_references()
  config.export.verify_examples = 100
  config.export.output_dir = str(tmp_path_factory.mktemp('export') / 'model')
  record = export.export(config, workdir)
  return config, workdir, record


def test_export_writes_and_records_its_verification(exported):
  config, _, record = exported
  out = config.export.output_dir
  assert sorted(os.listdir(out)) == ['export.json', 'labels.txt', 'model.tflite', 'saved_model']
  assert not os.path.exists(out + '.incomplete')
  assert json.load(open(os.path.join(out, 'export.json'))) == record
  assert open(os.path.join(out, 'labels.txt')).read().split() == [str(i) for i in range(10)]
  assert record['input'] == {'name': 'images', 'dtype': 'uint8', 'shape': [None, 8, 8, 1]}
  v = record['verification']
  assert v['examples'] == 100
  for fmt in ('saved_model', 'tflite'):
    assert v[fmt]['max_abs_prob_diff'] <= 1e-4 and v[fmt]['top1_agreement'] == 1.0


def test_saved_model_and_tflite_match_jax_on_new_inputs(exported):
  """Independent of the built-in check: other images, batch sizes 1 and 7, both formats."""
  config, workdir, _ = exported
  clf = inference.classifier(inference.load(workdir, config))
  rng = np.random.default_rng(0)
  for n in (1, 7):
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    want = clf.predict_arrays(images)
    out = config.export.output_dir
    for got in (export.run_saved_model(os.path.join(out, 'saved_model'), images),
                export.run_tflite(os.path.join(out, 'model.tflite'), images)):
      assert got['probabilities'].shape == (n, 10)
      np.testing.assert_allclose(got['probabilities'], want['probabilities'], atol=1e-5)
      np.testing.assert_allclose(got['logits'], want['logits'], atol=1e-4, rtol=1e-4)
      np.testing.assert_allclose(got['probabilities'].sum(-1), 1.0, atol=1e-5)


def test_export_fails_and_writes_nothing_when_outputs_disagree(exported, monkeypatch, tmp_path):
  config, workdir, _ = exported
  config = config.copy_and_resolve_references()
  config.export.output_dir = str(tmp_path / 'bad')
  config.export.tflite = False
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
  """Independent oracle: the run's own final evaluation. Both formats, on every test image,
  must give exactly the accuracy the trainer measured on that split."""
  config, _, _ = exported
  _, _, final = trained_run(tmp_path_factory, tfds_dir)
  x, y = digits.load_arrays('test')
  out = config.export.output_dir
  for got in (export.run_saved_model(os.path.join(out, 'saved_model'), x),
              export.run_tflite(os.path.join(out, 'model.tflite'), x)):
    accuracy = float(np.mean(got['probabilities'].argmax(-1) == y))
    assert len(y) == final['count']
    assert accuracy == pytest.approx(final['accuracy'], abs=1e-9)
