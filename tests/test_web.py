"""The web page in a real browser: headless Chromium (selenium) uploads image files through the
page's file input; the top-1 class and probabilities it shows must equal the JSON API's answer
for the same files. A screenshot is saved into the test's tmp dir on failure."""
import contextlib
import csv
import http.client
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, ood, serve
from imgcls_jax.data import digits
from tests.test_predict import trained_run, trainer_probabilities
from tests.test_serve import FewClasses

CHROMIUM = os.environ.get('CHROMIUM_BINARY', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('CHROMEDRIVER', '/usr/bin/chromedriver')
selenium = pytest.importorskip('selenium', reason='the browser test needs selenium (test extra)')
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
  pytest.skip(f'the browser test needs Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}; '
              'Debian packages chromium and chromium-driver)', allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope='module')
def served(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  cfg.max_batch_size = 8
  clf = inference.classifier(inference.load(workdir, config))
  srv = serve.make_server(clf, cfg).start()
  yield srv, config, workdir
  srv.close()


@contextlib.contextmanager
def screenshot_on_failure(driver, tmp_path):
  """Saves what the page showed when the block fails (path printed with the failure)."""
  try:
    yield
  except BaseException:
    path = tmp_path / 'page_on_failure.png'
    driver.save_screenshot(str(path))
    print(f'screenshot of the page: {path}')
    raise


def _api(url, data: bytes) -> tuple[int, dict]:
  host, port = url.split('//')[1].rsplit(':', 1)
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.request('POST', '/v1/classify?top_k=5', body=data)
  resp = conn.getresponse()
  out = resp.status, json.loads(resp.read())
  conn.close()
  return out


def test_page_shows_the_apis_top_classes_for_uploaded_files(served, browser, tmp_path):
  srv, config, workdir = served
  x, _ = digits.load_arrays('test')
  files = {}
  for i, (size, fmt) in enumerate([(8, 'PNG'), (64, 'PNG'), (96, 'JPEG')]):
    img = Image.fromarray(x[i, :, :, 0]).resize((size, size), Image.NEAREST)
    path = tmp_path / f'digit_{i}.{fmt.lower()}'
    img.convert('RGB' if fmt == 'JPEG' else 'L').save(path, fmt)
    files[path.name] = path
  (tmp_path / 'notes.txt').write_text('not an image')
  files['notes.txt'] = tmp_path / 'notes.txt'

  with screenshot_on_failure(browser, tmp_path):
    _check_page(srv, config, workdir, browser, files)


def _upload(browser, url, files, model_line):
  """Opens the page, checks its model line, and selects ``files`` at once through the file input
  (as a person choosing photos); returns when every card has its answer."""
  browser.get(url + '/')
  wait = WebDriverWait(browser, 60)
  wait.until(lambda d: 'classes' in d.find_element(By.ID, 'model').text)
  assert model_line in browser.find_element(By.ID, 'model').text
  browser.find_element(By.ID, 'file').send_keys('\n'.join(str(p) for p in files.values()))
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card')) == len(files) and not
             d.find_elements(By.CSS_SELECTOR, '.card[data-state="pending"]'))


def _check_page(srv, config, workdir, browser, files):
  x, _ = digits.load_arrays('test')
  _upload(browser, srv.url, files, '10 classes')

  shown = {}
  for card in browser.find_elements(By.CSS_SELECTOR, '.card'):
    name = card.find_element(By.CSS_SELECTOR, '.name').text
    rows = card.find_elements(By.CSS_SELECTOR, 'li')
    shown[name] = {'state': card.get_attribute('data-state'),
                   'status': card.find_element(By.CSS_SELECTOR, '.status').text,
                   'labels': [r.find_element(By.CSS_SELECTOR, '.label').text for r in rows],
                   'pcts': [r.find_element(By.CSS_SELECTOR, '.pct').text for r in rows],
                   'image_loaded': browser.execute_script(
                       'return arguments[0].complete && arguments[0].naturalWidth > 0',
                       card.find_element(By.TAG_NAME, 'img'))}
  assert set(shown) == set(files)
  for name, path in files.items():
    status, answer = _api(srv.url, path.read_bytes())
    page = shown[name]
    if status != 200:  # the page shows the API's one-sentence error
      assert name == 'notes.txt' and status == 415
      assert page['state'] == 'error' and page['status'] == answer['error'].replace(
          'The body', 'The uploaded file')
      continue
    assert page['state'] == 'done' and page['image_loaded'], page
    assert page['labels'][0] == answer['predictions'][0]['class'], (name, page, answer)
    assert page['labels'] == [p['class'] for p in answer['predictions']]
    shown_pct = [float(t.rstrip('%')) for t in page['pcts']]  # one decimal, as the page rounds
    np.testing.assert_allclose(shown_pct, [100 * p['probability'] for p in answer['predictions']],
                               rtol=0, atol=0.05 + 1e-9)
  # And the API agrees with the trainer's own prediction for the exact 8x8 file.
  want = trainer_probabilities(config, workdir, x[:1])[0]
  assert shown['digit_0.png']['labels'][0] == str(int(np.argmax(want)))


def test_page_works_for_a_model_of_fewer_classes_than_top_k(served, browser, tmp_path):
  """A 3-class model (below the default top_k of 5): the page shows each upload's 3 classes, the
  API's answer. The page asked for top_k=5, which such a model refused, so every upload failed."""
  srv, config, workdir = served
  x, _ = digits.load_arrays('test')
  clf = FewClasses(srv.batcher.clf, 3)
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  few = serve.make_server(clf, cfg, warm_up=False).start()
  files = {}
  for i in range(2):
    path = tmp_path / f'digit_{i}.png'
    Image.fromarray(x[i, :, :, 0]).save(path)
    files[path.name] = path
  try:
    with screenshot_on_failure(browser, tmp_path):
      _upload(browser, few.url, files, '3 classes')
      for card in browser.find_elements(By.CSS_SELECTOR, '.card'):
        name = card.find_element(By.CSS_SELECTOR, '.name').text
        status = card.find_element(By.CSS_SELECTOR, '.status').text
        assert card.get_attribute('data-state') == 'done', (name, status)
        labels = [r.text for r in card.find_elements(By.CSS_SELECTOR, 'li .label')]
        code, answer = _api(few.url, files[name].read_bytes())
        assert code == 200 and labels == [p['class'] for p in answer['predictions']], answer
        assert sorted(labels) == ['0', '1', '2'], labels
  finally:
    few.close()


def test_page_says_not_sure_and_unknown_where_the_api_does(served, browser, tmp_path):
  """A run with an abstention threshold (selective.py) between the confidences of two uploads
  and an unknown-input gate (ood.py) between their logits' log-sum-exps: the page marks exactly
  the answers the API abstains on, and exactly those it calls unknown."""
  import dataclasses
  srv, config, workdir = served
  x, _ = digits.load_arrays('test')
  files, top1 = {}, []
  for i in range(4):
    path = tmp_path / f'digit_{i}.png'
    Image.fromarray(x[i, :, :, 0]).save(path)
    files[path.name] = path
    top1.append(_api(srv.url, path.read_bytes())[1]['predictions'][0]['probability'])
  t = float(np.median(top1))
  assert min(top1) < t <= max(top1)    # some below it, some not
  trained = inference.load(workdir, config)
  clf = inference.classifier(trained)
  lse = ood.energy(clf.predict_arrays(np.stack([clf.prepare(str(p)) for p in files.values()]))[
      'logits'])
  low = np.sort(lse)
  below = float((low[0] + low[1]) / 2)  # one of the four below it, away from every score
  clf = inference.classifier(dataclasses.replace(trained, abstain={'min_confidence': t},
                                                 unknown={'below': below}))
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  gated = serve.make_server(clf, cfg).start()
  try:
    with screenshot_on_failure(browser, tmp_path):
      browser.get(gated.url + '/')
      wait = WebDriverWait(browser, 60)
      browser.find_element(By.ID, 'file').send_keys('\n'.join(str(p) for p in files.values()))
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card')) == len(files) and not
                 d.find_elements(By.CSS_SELECTOR, '.card[data-state="pending"]'))
      seen, unknown = 0, 0
      for card in browser.find_elements(By.CSS_SELECTOR, '.card'):
        name = card.find_element(By.CSS_SELECTOR, '.name').text
        answer = _api(gated.url, files[name].read_bytes())[1]
        status = card.find_element(By.CSS_SELECTOR, '.status').text
        assert answer['abstained'] == (answer['predictions'][0]['probability'] < t)
        assert ('Not sure' in status) == answer['abstained'], (name, status, answer)
        assert (card.get_attribute('data-abstained') == 'true') == answer['abstained']
        assert answer['unknown'] == (answer['logsumexp'] < np.float32(below))
        assert status.startswith('Unknown') == answer['unknown'], (name, status, answer)
        assert (card.get_attribute('data-unknown') == 'true') == answer['unknown']
        seen += answer['abstained']
        unknown += answer['unknown']
      assert 0 < seen < len(files) and unknown == 1
  finally:
    gated.close()


def test_review_page_applies_the_checked_rows(browser, tmp_path):
  """The label-review page (imgcls_jax/review.py): every row of the list is shown with its image
  (decoded by the browser), checking two rows and applying writes exactly those two changes, a
  stale row checked is shown as left alone, and the copy is what relabel.py writes for them."""
  from imgcls_jax import relabel, review
  from tests.test_review import review_case
  manifest, issues = review_case(str(tmp_path))
  out = str(tmp_path / 'page.csv')
  srv = review.Background(review.create_app(issues, manifest, out))
  try:
    with screenshot_on_failure(browser, tmp_path):
      browser.get(srv.url + '/')
      wait = WebDriverWait(browser, 60)
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card')) == 3)
      assert '3 likely label issues' in browser.find_element(By.ID, 'about').text
      wait.until(lambda d: all(d.execute_script('return arguments[0].complete && '
                                                'arguments[0].naturalWidth', img) == 8
                               for img in d.find_elements(By.CSS_SELECTOR, '.card img')))
      assert browser.find_element(By.CSS_SELECTOR, '#row-1 .change').text == '1 → 2'
      assert browser.find_element(By.ID, 'apply').get_attribute('disabled') is not None
      browser.find_element(By.ID, 'row-1').click()          # a click on the card checks it
      browser.find_element(By.ID, 'pick-2').click()         # and one on the box
      assert browser.find_element(By.ID, 'count').text == '2 checked'
      browser.find_element(By.ID, 'apply').click()
      wait.until(lambda d: d.find_element(By.ID, 'result').get_attribute('data-state'))
      assert browser.find_element(By.ID, 'result').get_attribute('data-state') == 'done'
      assert 'Relabelled 1 image, 1 left alone' in browser.find_element(By.ID, 'result').text
      assert 'done' in browser.find_element(By.ID, 'row-1').get_attribute('class')
      assert 'left alone' in browser.find_element(By.ID, 'row-2').text
    with open(out, newline='') as f:
      written = list(csv.reader(f))
    # The oracle: the manifest's labels (i % 3) with rank 1's image 4 changed to '2', rank 2 (a
    # stale row) not; the paths rewritten to the copy's folder.
    assert written == [['path', 'label', 'split']] + [
        [f'd/img/{i}.png', '2' if i == 4 else str(i % 3), 'train'] for i in range(8)]
    expected = relabel.relabel(issues, manifest, '1-2', str(tmp_path / 'cli.csv'))
    with open(expected['output'], newline='') as f:
      assert list(csv.reader(f)) == written   # the same copy as the command line writes
    # Unchecking the row and applying again (with another one checked) rewrites the copy.
    browser.find_element(By.ID, 'pick-1').click()
    browser.find_element(By.ID, 'pick-3').click()
    browser.find_element(By.ID, 'apply').click()
    wait.until(lambda d: d.find_element(By.ID, 'result').get_attribute('data-state'))
    assert 'done' not in browser.find_element(By.ID, 'row-1').get_attribute('class')
    assert 'done' in browser.find_element(By.ID, 'row-3').get_attribute('class')
    with open(out, newline='') as f:
      assert [r[1] for r in list(csv.reader(f))[1:]] == ['0', '1', '2', '0', '1', '1', '0', '1']
  finally:
    srv.close()
