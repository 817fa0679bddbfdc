"""--mode=embed: penultimate features of a trained run (the head's input: logits = features @ W
+ b), classical features of an image folder, unlabelled files, the k-NN evaluation against a
brute-force oracle, and the projection plot. A tagging run: multi-hot labels stored, the k-NN tag
vote against scikit-learn, nothing written when a step fails; the classical extractor on a trained
run's workdir embeds the run's data beside (not over) the model's embeddings."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import checkpoint_files, embed, features, inference, train
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests.conftest import REPO, main_run_here, subprocess_env
from tests.test_classical import digits_folder
from tests.test_predict import trained_run


@pytest.fixture(scope='module')
def run(tmp_path_factory, tfds_dir):
  return trained_run(tmp_path_factory, tfds_dir)


def test_model_embeddings_of_a_tfds_split_are_the_heads_input(run, tmp_path):
  config, workdir, final = run
  c = config.copy_and_resolve_references()
  c.embed.output_dir = str(tmp_path)
  c.embed.tsne_max = 100
  summary = embed.embed(c, workdir)
  with np.load(tmp_path / 'embeddings.npz') as z:
    feats, labels, paths = z['features'], z['labels'], list(z['paths'])
    names = list(z['class_names'])
  _, y = digits.load_arrays('test')
  assert feats.shape == (450, 16)  # widths (8, 16): the last stage's 16 channels, pooled
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(y))  # tfds reads its own order
  x, labels_again, _ = features.split_arrays(config.data, 'test')
  np.testing.assert_array_equal(labels, labels_again)
  assert paths[:2] == ['sklearn_digits:test[0]', 'sklearn_digits:test[1]']
  assert names == [str(i) for i in range(10)]
  # Oracle: the classifier's own logits are the head applied to these features.
  clf = inference.classifier(inference.load(workdir, config))
  head = clf.trained.variables.params['head']
  np.testing.assert_allclose(feats @ np.asarray(head['kernel']) + np.asarray(head['bias']),
                             clf.predict_arrays(x)['logits'], rtol=1e-4, atol=1e-4)
  knn = summary['knn']
  assert knn['reference_split'] == 'train' and knn['reference_examples'] == 1347
  with open(tmp_path / 'knn' / 'report.json') as f:
    knn_report = json.load(f)
  assert knn_report['accuracy'] == knn['accuracy']
  # Which weights: the run's latest checkpoint (predict's), recorded in both reports.
  latest = max(checkpoint_files.finished_steps(f'{workdir}/checkpoints'))
  assert summary['checkpoint_step'] == knn_report['context']['checkpoint_step'] == latest
  assert f'checkpoint {latest}' in (tmp_path / 'embed_report.md').read_text()
  # Features the trained head separates are far better than chance for k-NN too.
  assert knn['accuracy'] > 0.5 * final['accuracy'] + 0.05
  assert summary['projection'] == {'pca_points': 450, 'tsne_points': 100}
  with Image.open(tmp_path / 'projection.png') as im:
    assert im.size[0] > 600


def _brute_force_knn(ref, ref_y, x, k, num_classes):
  """Distance-weighted k-NN by hand: cosine distance, the k nearest, votes 1 / distance."""
  a = x / np.linalg.norm(x, axis=1, keepdims=True)
  b = ref / np.linalg.norm(ref, axis=1, keepdims=True)
  dist = 1 - a @ b.T
  votes = np.zeros((len(x), num_classes))
  for i, row in enumerate(dist):
    for j in np.argsort(row, kind='stable')[:k]:
      votes[i, ref_y[j]] += 1 / row[j]
  return votes / votes.sum(axis=1, keepdims=True)


def _clusters():
  """(reference features, their classes, features, their classes, the class centres): three
  Gaussian clusters in 5-d, 20 reference and 5 test points each."""
  rng = np.random.RandomState(0)
  centres = rng.normal(size=(3, 5)) * 3
  ref_y = np.repeat(np.arange(3), 20)
  ref = centres[ref_y] + rng.normal(size=(60, 5))
  y = np.repeat(np.arange(3), 5)
  return ref, ref_y, centres[y] + rng.normal(size=(15, 5)), y, centres


def test_knn_matches_a_brute_force_oracle():
  ref, ref_y, x, y, _ = _clusters()
  probs, classes = embed.knn_evaluate(ref, ref_y, x, k=7, metric='cosine')
  np.testing.assert_array_equal(classes, [0, 1, 2])
  np.testing.assert_allclose(probs, _brute_force_knn(ref, ref_y, x, 7, 3), rtol=1e-6, atol=1e-9)
  with pytest.raises(UserError, match='knn_k=0 must be at least 1'):
    embed.knn_evaluate(ref, ref_y, x, k=0, metric='cosine')


def test_knn_report_loss_is_sklearns_or_infinite_with_a_note():
  """The k-NN report's log loss: scikit-learn's on the vote shares; an example none of whose k
  nearest is of its class has probability 0 there, so the loss is infinite (it was a figure
  set by a 1e-12 clip)."""
  from sklearn.metrics import log_loss
  from imgcls_jax import embed_knn, report_text
  ref, ref_y, x, y, centres = _clusters()
  k = 30   # wide enough that every example has a neighbour of its class
  rep = embed_knn.knn_report(ref, ref_y, x, y, ['a', 'b', 'c'], k=k, metric='euclidean',
                             calibration_bins=10)
  probs, _ = embed.knn_evaluate(ref, ref_y, x, k=k, metric='euclidean')
  assert probs[np.arange(15), y].min() > 0
  assert rep['loss'] == pytest.approx(log_loss(y, probs), rel=1e-5) and 'loss_note' not in rep
  x[0] = centres[2]   # a class-0 example among class 2's: its 7 nearest are all class 2
  rep = embed_knn.knn_report(ref, ref_y, x, y, ['a', 'b', 'c'], k=7, metric='euclidean',
                             calibration_bins=10)
  assert rep['loss'] == float('inf')
  assert rep['loss_note'].startswith('1 of 15 examples had no neighbour of their own class')
  assert rep['loss_note'] in report_text.notes(rep)


def test_classical_embeddings_of_an_image_folder(digits_config, tmp_path, caplog):
  root = digits_folder(str(tmp_path / 'images'))
  c = digits_config
  c.data.name = 'image_folder'
  c.data.folder = root
  c.classical.hog_cell = 2
  c.embed.extractor = 'classical'
  c.embed.split = 'test'
  c.embed.knn_k = 3
  c.embed.tsne_max = 0
  summary = embed.embed(c, str(tmp_path / 'out'))
  out = tmp_path / 'out' / 'embed_test_classical'   # never over the model's embed_test
  with np.load(out / 'embeddings.npz') as z:
    feats, labels, paths = z['features'], z['labels'], list(z['paths'])
  assert len(paths) == 18 and all(p.startswith(root) and p.endswith('.png') for p in paths)
  # Each label is the class folder the file lies in; the features are the file's own.
  names = summary['class_names']
  assert [names[i] for i in labels] == [os.path.basename(os.path.dirname(p)) for p in paths]
  spec = features.spec_from_config(c.classical)
  image = np.asarray(Image.open(paths[5]))[..., None]
  np.testing.assert_allclose(feats[5], features.extract(image[None], spec)[0], rtol=1e-6)
  assert summary['knn']['reference_examples'] == 60     # broken.png skipped
  assert summary['knn']['accuracy'] > 0.8
  assert any('broken.png' in r.getMessage() for r in caplog.records)


def test_a_knn_k_above_the_reference_size_is_capped_and_recorded(digits_config, tmp_path, caplog):
  """knn_k larger than the reference split: all of it are the neighbours, with a warning, and the
  report records the k used (the same figure as asking for exactly that many)."""
  root = digits_folder(str(tmp_path / 'images'))
  c = digits_config
  c.data.name, c.data.folder = 'image_folder', root
  c.classical.hog_cell = 2
  c.embed.extractor, c.embed.split, c.embed.tsne_max = 'classical', 'test', 0
  c.embed.knn_k = 5000
  summary = embed.embed(c, str(tmp_path / 'big'))
  knn = summary['knn']
  assert (knn['k'], knn['k_requested'], knn['reference_examples']) == (60, 5000, 60)
  assert any("knn_k=5000 is more than the 60 examples of the reference split 'train'"
             in r.getMessage() for r in caplog.records)
  out = tmp_path / 'big' / 'embed_test_classical'
  with open(out / 'embed_report.json') as f:
    assert json.load(f)['knn']['k'] == 60
  with open(out / 'embed_report.md') as f:
    assert "- 60-NN (cosine, reference 'train', 60 examples, knn_k=5000 capped" in f.read()
  with open(out / 'knn' / 'report.json') as f:
    assert json.load(f)['context']['model'].startswith('60-NN (cosine)')
  c.embed.knn_k = 60
  exact = embed.embed(c, str(tmp_path / 'exact'))['knn']
  assert (exact['k'], exact['k_requested']) == (60, 60)
  assert (exact['accuracy'], exact['f1_macro']) == (knn['accuracy'], knn['f1_macro'])
  # Rerun without a k-NN: the earlier knn/ report went stale beside an embed_report.json that no
  # longer has one; it is removed, a file the user put there is kept.
  (out / 'knn' / 'mine.txt').write_text('notes')
  c.embed.reference_split = 'none'
  assert 'knn' not in embed.embed(c, str(tmp_path / 'big'))
  assert sorted(os.listdir(out / 'knn')) == ['mine.txt']
  os.remove(out / 'knn' / 'mine.txt')
  c.embed.reference_split = ''
  assert 'knn' in embed.embed(c, str(tmp_path / 'big'))
  c.embed.reference_split = 'none'
  embed.embed(c, str(tmp_path / 'big'))
  assert not os.path.exists(out / 'knn')      # nothing else there: the folder goes too


def test_unlabelled_files_skip_unreadable_ones_and_need_one_readable(run, tmp_path, caplog):
  config, workdir, _ = run
  x, _ = digits.load_arrays('test')
  folder = tmp_path / 'files'
  folder.mkdir()
  for i in range(4):
    Image.fromarray(x[i, :, :, 0]).save(folder / f'{i}.png')
  (folder / 'bad.png').write_text('not an image')
  c = config.copy_and_resolve_references()
  c.embed.inputs = str(folder)
  c.embed.output_dir = str(tmp_path / 'out')
  summary = embed.embed(c, workdir)
  assert summary['num_examples'] == 4 and 'knn' not in summary
  with np.load(tmp_path / 'out' / 'embeddings.npz') as z:
    assert list(z['labels']) == [-1] * 4
    assert [os.path.basename(p) for p in z['paths']] == ['0.png', '1.png', '2.png', '3.png']
  assert any('bad.png' in r.getMessage() for r in caplog.records)
  c.embed.inputs = str(folder / 'bad.png')
  with pytest.raises(UserError, match='None of the 1 input file.*is a readable image'):
    embed.embed(c, workdir)
  c.embed.inputs = str(folder / 'missing.png')
  with pytest.raises(UserError, match='does not exist'):
    embed.embed(c, workdir)
  c.embed.inputs = ''
  c.embed.extractor = 'pixels'
  with pytest.raises(UserError, match="extractor='pixels' must be one of model, classical"):
    embed.embed(c, workdir)


@pytest.mark.parametrize('key, value, match', [
    ('knn_metric', 'bogus', "config.embed.knn_metric='bogus' is not a k-NN metric; use one of "
                            'braycurtis, .*cosine, .*euclidean'),
    ('batch_size', 0, 'config.embed.batch_size=0 must be a positive number of images'),
    ('knn_k', 0, 'config.embed.knn_k=0 must be at least 1'),
    ('tsne_max', -5, r'config.embed.tsne_max=-5 must be >= 0'),
])
def test_bad_embed_options_fail_before_any_work(digits_config, tmp_path, key, value, match):
  digits_config.embed[key] = value
  # No run in the workdir: an option checked only after loading the model would say so instead.
  with pytest.raises(UserError, match=match):
    embed.embed(digits_config, str(tmp_path / 'no_run'))
  assert not os.path.exists(tmp_path / 'no_run')


def test_cli_embed_takes_the_model_from_the_workdir(run, tmp_path, capsys, monkeypatch):
  """The command line without --config (``main.run`` in-process, the entry point of ``python -m
  imgcls_jax.main``, whose child process test_classical_embed_of_arrays_... runs)."""
  config, workdir, _ = run
  out = main_run_here(monkeypatch, capsys, '--mode=embed', f'--workdir={workdir}',
                      f'--config.data.data_dir={config.data.data_dir}', '--config.embed.tsne_max=0',
                      f'--config.embed.output_dir={tmp_path}', '--config.embed.knn_k=5')
  assert out.returncode == 0, out.stderr[-2000:]
  assert '5-NN (cosine' in out.stdout and '450 examples x 16 dimensions' in out.stdout, out
  assert os.path.exists(tmp_path / 'projection.png')


TAGS = ('even', 'small', 'three', 'big')


def _tag_arrays(path):
  """An arrays file of 8x8 digits tagged by properties of the digit (multi-hot, 1-3 tags each);
  returns the test split's rows."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images * 255 / 16).astype(np.uint8)[..., None]
  y = d.target
  tags = np.stack([y % 2 == 0, y < 5, y % 3 == 0, y >= 7], 1)
  np.savez(path, train_images=x[:320], train_labels=tags[:320], test_images=x[320:400],
           test_labels=tags[320:400], class_names=np.asarray(TAGS), mirror_safe=np.asarray(False))
  return tags[320:400].astype(np.int64)


@pytest.fixture(scope='module')
def tagged(tmp_path_factory):
  """(config, workdir, test rows) of a tagging run on an arrays file, trained briefly."""
  root = tmp_path_factory.mktemp('tag_arrays')
  test_rows = _tag_arrays(str(root / 'tags.npz'))
  sys.path.insert(0, REPO)
  from configs import default
  c = default.get_config()
  c.data.name = f'arrays:{root}/tags.npz'
  c.data.multilabel = True
  c.data.device_preprocess = ''
  c.model.widths = (8, 16)
  c.batch_size = c.eval_batch_size = 64
  c.num_train_steps = 30
  c.eval_every_epochs = c.checkpoint_every_epochs = -1.0
  c.progress_bar = c.tensorboard = False
  workdir = str(tmp_path_factory.mktemp('tagged_run'))
  train.train_and_evaluate(c, workdir)
  return c, workdir, test_rows


def test_knn_tag_vote_matches_scikit_learn():
  """A tag is predicted when at least half of the k nearest carry it (k even: ties count)."""
  from sklearn.neighbors import KNeighborsClassifier
  rng = np.random.RandomState(1)
  ref, x = rng.normal(size=(40, 6)), rng.normal(size=(25, 6))
  ref_tags = (rng.random_sample((40, 3)) < 0.4).astype(np.int64)
  votes = embed.knn_tag_votes(ref, ref_tags, x, k=4, metric='euclidean')
  knn = KNeighborsClassifier(4, metric='euclidean', algorithm='brute').fit(ref, ref_tags)
  oracle = np.stack([p[:, 1] for p in knn.predict_proba(x)], 1)
  np.testing.assert_allclose(votes, oracle, atol=1e-7)
  assert np.any(votes == 0.5)   # the >= 0.5 rule is exercised


def _sklearn_tag_knn(ref, ref_tags, x, k, metric):
  from sklearn.neighbors import KNeighborsClassifier
  knn = KNeighborsClassifier(k, metric=metric, algorithm='brute').fit(ref, ref_tags)
  return np.stack([p[:, list(c).index(1)] for p, c in zip(knn.predict_proba(x), knn.classes_)],
                  1) >= 0.5


def test_a_tagging_run_embeds_multi_hot_labels_and_scores_the_tag_vote(tagged, tmp_path):
  from sklearn import metrics as skm
  c, workdir, test_rows = tagged
  c = c.copy_and_resolve_references()
  c.embed.split, c.embed.knn_k, c.embed.tsne_max = 'test', 5, 30
  c.embed.output_dir = str(tmp_path / 'test')
  summary = embed.embed(c, workdir)
  c.embed.split, c.embed.reference_split = 'train', 'none'   # (the projection of tags alone)
  c.embed.output_dir = str(tmp_path / 'train')
  ref_summary = embed.embed(c, workdir)
  assert 'knn' not in ref_summary and ref_summary['task'] == 'multilabel'
  assert ref_summary['projection']['coloured_by'].startswith('first tag')
  with np.load(tmp_path / 'test' / 'embeddings.npz') as z:
    feats, labels, multi = z['features'], z['labels'], bool(z['multilabel'])
  with np.load(tmp_path / 'train' / 'embeddings.npz') as z:
    ref, ref_tags = z['features'], z['labels']
  assert multi and list(summary['class_names']) == list(TAGS)
  np.testing.assert_array_equal(labels, test_rows)    # the multi-hot rows, in file order
  assert ref_tags.shape == (320, 4)
  pq = pytest.importorskip('pyarrow.parquet')
  assert pq.read_table(tmp_path / 'test' / 'embeddings.parquet').column(
      'label').to_pylist() == test_rows.tolist()
  # Oracle: scikit-learn's k-NN on the saved embeddings, scored by sklearn.metrics.
  pred = _sklearn_tag_knn(ref, ref_tags, feats, 5, 'cosine')
  knn = summary['knn']
  assert knn['task'] == 'multilabel' and knn['k'] == 5 and knn['reference_examples'] == 320
  assert knn['f1_micro'] == pytest.approx(skm.f1_score(labels, pred, average='micro'), abs=1e-9)
  assert knn['f1_macro'] == pytest.approx(skm.f1_score(labels, pred, average='macro'), abs=1e-9)
  assert knn['exact_match'] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-9)
  assert 'accuracy' not in knn    # no top-1 figure for tags
  with open(tmp_path / 'test' / 'knn' / 'report.json') as f:
    assert json.load(f)['task'] == 'multilabel'
  with open(tmp_path / 'test' / 'embed_report.md') as f:
    md = f.read()
  assert '5-NN tag vote' in md and 'metrics for tags: F1 micro' in md
  assert 'coloured by the first tag' in md
  with open(tmp_path / 'test' / 'embed_report.json') as f:
    assert json.load(f)['knn']['metrics_for'].startswith('tags')


@pytest.mark.parametrize('which', ['run', 'tagged'])
def test_a_failing_step_leaves_no_half_written_embeddings(which, request, tmp_path, monkeypatch):
  c, workdir, _ = request.getfixturevalue(which)
  c = c.copy_and_resolve_references()
  c.embed.split, c.embed.tsne_max, c.embed.output_dir = 'test', 0, str(tmp_path)
  (tmp_path / 'embeddings.npz').write_bytes(b'earlier')

  def fail(*args, **kwargs):
    raise RuntimeError('projection failed')
  monkeypatch.setattr(embed, 'projection_png', fail)
  with pytest.raises(RuntimeError, match='projection failed'):
    embed.embed(c, workdir)
  assert sorted(os.listdir(tmp_path)) == ['embeddings.npz']
  assert (tmp_path / 'embeddings.npz').read_bytes() == b'earlier'


def test_classical_embed_of_a_trained_run_embeds_its_data_beside_the_model_features(
    tagged, tmp_path, monkeypatch, capsys):
  """No --config (the command line, ``main.run`` in-process): the run's own data (not the
  default config's digits), written to embed_<split>_classical, so the model's embed_<split>
  stays as it was."""
  c, workdir, test_rows = tagged
  model_out = os.path.join(workdir, 'embed_test')
  os.makedirs(model_out, exist_ok=True)   # where --mode=embed put the model's features
  with open(os.path.join(model_out, 'embeddings.npz'), 'wb') as f:
    f.write(b'the model features')
  proc = main_run_here(monkeypatch, capsys, '--mode=embed', f'--workdir={workdir}',
                       '--config.embed.extractor=classical', '--config.embed.tsne_max=0',
                       '--config.classical.hog_cell=2')
  assert proc.returncode == 0, proc.stderr[-2000:]
  with np.load(os.path.join(workdir, 'embed_test_classical', 'embeddings.npz')) as z:
    np.testing.assert_array_equal(z['labels'], test_rows)     # the run's 80 tagged images
    assert z['paths'][0] == f'{c.data.name}:test[0]'
  with open(os.path.join(model_out, 'embeddings.npz'), 'rb') as f:
    assert f.read() == b'the model features'
  # A --config naming other data than the run's is refused, not embedded beside it.
  sys.path.insert(0, REPO)
  from configs import default
  other = default.get_config()
  other.data.name = 'fashion_mnist'
  other.embed.extractor = 'classical'
  with pytest.raises(UserError, match="holds a run trained on 'arrays:.*', not on the --config's "
                                      "data 'fashion_mnist'.*drop --config"):
    embed.embed(other, workdir, overrides={'embed.extractor': 'classical'})
  other.data.name = 'sklearn_digits'
  with pytest.raises(UserError, match="not on --config.data.name 'sklearn_digits'"):
    embed.embed(other, workdir, overrides={'embed.extractor': 'classical',
                                           'data.name': 'sklearn_digits'})


def test_classical_embed_of_a_classical_fit_uses_its_data_and_features(tmp_path, caplog):
  """On a --mode=classical fit's folder (the command line: the schema's config, the flags as
  overrides): the fit's images and features (were the default config's digits at its 109-d
  default features), so its own model scores them as its fit did; a flag changing the features
  is refused, a --config with others is said, in one line each."""
  from imgcls_jax import classical, classical_model
  from tests.test_classical_runs import default_config
  c = default_config()
  c.data.name, c.data.index_cache = 'image_folder', 'off'
  c.data.folder = digits_folder(str(tmp_path / 'images'), classes=(0, 1, 2, 3, 7),
                                per_class=(12, 4), bad_file=False)
  c.classical.hog_cell, c.classical.lbp_grid, c.classical.workers = 2, 1, 1
  fit = str(tmp_path / 'fit')
  rep = classical.classical(c, fit)
  cli = default_config()   # --mode=embed --workdir=FIT --config.embed.extractor=classical
  cli.embed.extractor, cli.embed.tsne_max = 'classical', 0
  flags = {'embed.extractor': 'classical', 'embed.tsne_max': 0}
  summary = embed.embed(cli, fit, overrides=flags)
  with np.load(os.path.join(fit, 'embed_test_classical', 'embeddings.npz')) as z:
    feats, labels, names = z['features'], z['labels'], list(z['class_names'])
  meta, pixels, fitted = classical_model.load(fit)
  run = classical_model.run_config(meta, {}, fit)
  x, y, _ = features.split_arrays(run.data, 'test')
  np.testing.assert_allclose(feats, features.extract(x, classical_model.spec_of(run)), rtol=1e-6)
  assert feats.shape == (20, sum(meta['feature_blocks'].values())) and feats.shape[1] != 109
  np.testing.assert_array_equal(labels, y)
  scores = classical_model.class_scores(fitted, feats, len(names))
  assert np.mean(scores.argmax(1) == labels) == rep['accuracy']   # its fit's evaluation
  with open(os.path.join(fit, 'embed_test_classical', 'knn', 'report.json')) as f:
    knn_report = json.load(f)
  assert names == knn_report['class_names'] == ['0', '1', '2', '3', '7'] == list(
      pixels.info.class_names)
  assert (summary['knn']['reference_examples'], knn_report['num_examples']) == (60, 20)
  cli.classical.lbp_grid = 2
  with pytest.raises(UserError) as e:
    embed.embed(cli, fit, overrides={**flags, 'classical.lbp_grid': 2})
  assert str(e.value) == (
      f'--config.classical.lbp_grid=2 would change the features of the classical fit in '
      f'--workdir (its classical.lbp_grid=1, in {fit}/classical.json), which the classical '
      'extractor embeds with; drop that flag, or give a --workdir without a fit.')
  from configs import digits_classical   # --config=configs/digits_classical.py
  other = digits_classical.get_config()
  other.data.name, other.embed.extractor, other.embed.tsne_max = 'image_folder', 'classical', 0
  caplog.clear()
  embed.embed(other, fit, overrides={**flags, 'data.name': 'image_folder'})
  said = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert said == [
      "The config's classical features (lbp_grid=2, edge_sigma=0.5, edge_grid=2) are not those "
      f'of the classical fit in {fit} (lbp_grid=1, edge_sigma=1.0, edge_grid=4): embedding with '
      "the fit's; give a --workdir without a fit for other features."]
  with np.load(os.path.join(fit, 'embed_test_classical', 'embeddings.npz')) as z:
    np.testing.assert_array_equal(z['features'], feats)
  cv = tmp_path / 'cv'   # a classical cross-validation's folder: one fit per fold (was the
  shutil.copytree(fit, cv / 'fold_0')   # default digits at the default features, silently)
  with pytest.raises(UserError, match=rf'^--workdir={cv} holds a classical cross-validation .*: '
                     rf'--workdir={cv}/fold_0 \(or another fold\)\.$'):
    embed.embed(cli, str(cv), overrides=flags)


def test_classical_embed_of_arrays_reads_them_unaugmented_as_the_classical_mode(tmp_path):
  """configs/digits_classical.py names a host augmentation ('pad_crop(pad=1)'), which arrays
  refuse: --mode=classical clears it, and embed (which never augments) now does too (it was
  refused)."""
  out = subprocess.run(
      [sys.executable, '-m', 'imgcls_jax.main', '--mode=embed',
       '--config=configs/digits_classical.py', '--config.data.name=arrays:sklearn_digits',
       '--config.embed.extractor=classical', '--config.embed.split=test', f'--workdir={tmp_path}',
       '--config.embed.tsne_max=0', '--config.classical.workers=1',
       '--config.embed.reference_split=none'],   # (no k-NN: the train split is not embedded)
      capture_output=True, text=True, env=subprocess_env(1), timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(tmp_path / 'embed_test_classical' / 'embeddings.npz') as z:
    feats = z['features']
  from configs import digits_classical
  x, _ = digits.load_arrays('test')
  spec = features.spec_from_config(digits_classical.get_config().classical)
  np.testing.assert_allclose(feats, features.extract(x, spec), rtol=1e-6)
  assert feats.shape == (450, 385)
