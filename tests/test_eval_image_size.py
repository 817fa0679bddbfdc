"""--mode=evaluate of a trained run on the user's own images of another size than the model's
input: refused in one line that asks for the resize, and right once it is given."""
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import evaluate, inference, train
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests.conftest import small_digits_config


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  """The default config's run (the digits read as arrays), shrunk: a narrow CNN, 10 steps."""
  c = small_digits_config(tfds_dir)
  c.data.name, c.data.train_preprocess = 'arrays:sklearn_digits', ''   # configs/default.py's
  c.data.device_preprocess = 'translate(pad=1)'
  c.model.widths = (8, 16)
  c.num_train_steps = 10
  workdir = str(tmp_path_factory.mktemp('size_run') / 'run')
  train.train_and_evaluate(c, workdir)
  return workdir


def _folder(root, scale, mode='L', per_class=3):
  """root/<digit>/<k>.png: the first test digits of each class, upscaled ``scale`` times (nearest
  neighbour: a bilinear resize back to 8x8 samples inside each block, so gives the digit again);
  returns the original 8x8 images and their labels."""
  x, y = digits.load_arrays('test')
  keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
  for k, i in enumerate(keep):
    os.makedirs(os.path.join(root, str(y[i])), exist_ok=True)
    im = Image.fromarray(x[i, :, :, 0]).resize((8 * scale, 8 * scale), Image.NEAREST)
    im.convert(mode).save(os.path.join(root, str(y[i]), f'{k}.png'))
  return x[keep], y[keep]


def test_a_folder_of_larger_images_is_refused_and_evaluated_once_resized(run, tmp_path):
  """Was: 64x64 digits evaluated by the 8x8 model at 64x64 (its global pooling takes any size):
  ~33% top-1 where --mode=predict, which resizes, got ~99%, and no word of the size."""
  big = str(tmp_path / 'big')
  x, y = _folder(big, scale=8)
  out = {'evaluate.label_issues': False, 'evaluate.output_dir': str(tmp_path / 'report')}
  with pytest.raises(UserError, match=(
      r"^The images of split 'all' of .*big are 64x64x1 \(height x width x channels\) where the "
      r'model reads 8x8x1; add --config.data.eval_preprocess=\'resize\(size=8\)\' to evaluate '
      r'them at its size\.$')):
    evaluate.evaluate(None, run, overrides={'data.folder': big, **out})
  # With the resize: the digits again, scored as the model scores the 8x8 originals.
  clf = inference.classifier(inference.load(run, None, overrides={}))
  top1 = float(np.mean(clf.predict_arrays(x)['probabilities'].argmax(-1) == y))
  rep = evaluate.evaluate(None, run, overrides={'data.folder': big,
                                                'data.eval_preprocess': 'resize(size=8)', **out})
  assert rep['num_examples'] == 30 and rep['accuracy'] == pytest.approx(top1, abs=1e-6)
  # An RGB folder for the grey model: decoded to grey, as predict does (R = G = B: the same grey).
  rgb = str(tmp_path / 'rgb')
  _folder(rgb, scale=1, mode='RGB')
  rep = evaluate.evaluate(None, run, overrides={'data.folder': rgb, **out})
  assert rep['num_examples'] == 30 and rep['accuracy'] == pytest.approx(top1, abs=1e-6)

