"""The label-review page's endpoints (imgcls_jax/review.py) through Starlette's test client; the
page itself in headless Chromium is tests/test_web.py's test_review_page_*."""
from __future__ import annotations

import csv
import os

import pytest
from starlette.testclient import TestClient

from imgcls_jax import label_issues, review
from imgcls_jax.errors import UserError
from tests.test_relabel import _manifest

LOCAL = 'http://127.0.0.1:8000'   # the test client's requests carry this Host, as the page's do


def review_case(root):
  """A manifest of 8 digits (labels i % 3) and a list of 3 rows: two fixable, one stale."""
  manifest = _manifest(os.path.join(root, 'd'), [str(i % 3) for i in range(8)])
  rows = [{'rank': 1, 'id': 'img/4.png', 'fold': 0, 'label': '1', 'suggested': '2',
           'p_label': 0.01, 'p_suggested': 0.98},
          {'rank': 2, 'id': 'img/6.png', 'fold': 1, 'label': '2', 'suggested': '0',  # stale
           'p_label': 0.02, 'p_suggested': 0.97},
          {'rank': 3, 'id': 'img/5.png', 'fold': 2, 'label': '2', 'suggested': '1',
           'p_label': 0.03, 'p_suggested': 0.9}]
  issues = os.path.join(root, 'cv_label_issues.csv')
  label_issues.write_csv(rows, issues, label_issues.COLUMNS)
  return manifest, issues


def test_the_endpoints_list_show_and_apply(tmp_path):
  manifest, issues = review_case(str(tmp_path))
  client = TestClient(review.create_app(issues, manifest), base_url=LOCAL)
  page = client.get('/')
  assert page.status_code == 200 and 'Apply the checked rows' in page.text
  listed = client.get('/v1/issues').json()
  assert not listed['tagged'] and [r['id'] for r in listed['rows']] == ['img/4.png', 'img/6.png',
                                                                         'img/5.png']
  assert listed['output'] == manifest[:-4] + '.relabelled.csv'
  image = client.get('/v1/image/3')
  assert image.status_code == 200 and image.headers['content-type'] == 'image/png'
  with open(os.path.join(os.path.dirname(manifest), 'img/5.png'), 'rb') as f:
    assert image.content == f.read()
  done = client.post('/v1/apply', json={'ranks': [3, 1, 2]}).json()
  assert [r[0] for r in done['relabelled']] == ['1', '3']
  assert done['left_alone'] == [['2', 'img/6.png', "labelled '0' in the manifest, not '2' as "
                                                   'listed']]
  with open(done['output'], newline='') as f:
    got = [r[1] for r in list(csv.reader(f))[1:]]
  assert got == ['0', '1', '2', '0', '2', '1', '0', '1']   # ranks 1 and 3 applied, nothing else
  with open(manifest, newline='') as f:
    assert [r[1] for r in list(csv.reader(f))[1:]] == [str(i % 3) for i in range(8)]


@pytest.mark.parametrize('request_args, status, message', [
    (('get', '/v1/image/9'), 404, 'No row of rank 9 in the list (ranks 1-3).'),
    (('post', '/v1/apply', {'content': b'not json', 'headers': {'content-type':
                                                                'application/json'}}),
     400, 'The body is not JSON'),
    (('post', '/v1/apply', {'json': {'ranks': []}}), 400, 'a non-empty list of the ranks'),
    (('post', '/v1/apply', {'json': {'ranks': ['1']}}), 400, 'a non-empty list of the ranks'),
    (('post', '/v1/apply', {'json': {'ranks': [1, 7]}}), 400, 'Rank 7 is not in the list'),
    (('get', '/v1/apply'), 405, ''),
    (('post', '/v1/apply', {'content': b'{"ranks": [1]}', 'headers': {'content-type':
                                                                      'text/plain'}}),
     415, 'Send the ranks as JSON (Content-Type: application/json)'),
    (('post', '/v1/apply', {'json': {'ranks': [1]}, 'headers': {'origin': 'http://evil.example'}}),
     403, 'A request from http://evil.example may not apply rows'),
    (('post', '/v1/apply', {'json': {'ranks': [1]}, 'headers': {'host': 'evil.example:8000'}}),
     403, "Host 'evil.example' is not this page's address"),
    (('get', '/v1/issues', {'headers': {'host': 'evil.example'}}), 403, 'is not this page'),
])
def test_bad_requests_get_one_sentence(tmp_path, request_args, status, message):
  manifest, issues = review_case(str(tmp_path))
  client = TestClient(review.create_app(issues, manifest), base_url=LOCAL)
  method, url, *kwargs = request_args
  response = getattr(client, method)(url, **(kwargs[0] if kwargs else {}))
  assert response.status_code == status
  if message:
    assert message in response.json()['error']
  assert not os.path.exists(manifest[:-4] + '.relabelled.csv')


def test_an_image_outside_the_manifests_folder_is_not_served(tmp_path):
  manifest, _ = review_case(str(tmp_path))
  (tmp_path / 'secret.png').write_bytes(b'x')
  issues = str(tmp_path / 'evil.csv')
  label_issues.write_csv([{'rank': 1, 'id': '../secret.png', 'fold': 0, 'label': '0',
                           'suggested': '1', 'p_label': 0.1, 'p_suggested': 0.9}], issues,
                         label_issues.COLUMNS)
  response = TestClient(review.create_app(issues, manifest), base_url=LOCAL).get('/v1/image/1')
  assert response.status_code == 404 and 'is not a file of' in response.json()['error']


def test_a_bad_list_or_port_is_one_line(tmp_path, capsys):
  manifest, issues = review_case(str(tmp_path))
  with pytest.raises(UserError, match='Cannot read the label-issue list'):
    review.create_app(str(tmp_path / 'none.csv'), manifest)
  busy = review.Background(review.create_app(issues, manifest))
  try:
    port = busy.url.rsplit(':', 1)[1]
    assert review.main([f'--issues={issues}', f'--manifest={manifest}', f'--port={port}']) == 2
    assert capsys.readouterr().err.startswith(f'Error: cannot listen on 127.0.0.1:{port} (')
  finally:
    busy.close()


def test_an_image_folder_is_reviewed_into_a_manifest(tmp_path):
  from tests.test_classical import digits_folder
  root = digits_folder(str(tmp_path / 'photos'))
  issues = str(tmp_path / 'cv_label_issues.csv')
  label_issues.write_csv([{'rank': 1, 'id': 'train/1/3.png', 'fold': 0, 'label': '1',
                           'suggested': '7', 'p_label': 0.01, 'p_suggested': 0.98}], issues,
                         label_issues.COLUMNS)
  client = TestClient(review.create_app(issues, '', folder=root), base_url=LOCAL)
  with open(os.path.join(root, 'train/1/3.png'), 'rb') as f:
    assert client.get('/v1/image/1').content == f.read()
  done = client.post('/v1/apply', json={'ranks': [1]}).json()
  assert done['output'] == root + '.relabelled.csv' and len(done['relabelled']) == 1
  with open(done['output'], newline='') as f:
    got = {r[0]: (r[1], r[2]) for r in csv.reader(f)}
  assert got['photos/train/1/3.png'] == ('7', 'train')
  assert got['photos/test/7/0.png'] == ('7', 'test')
  assert got['photos/train/1/2.png'] == ('1', 'train')
  with pytest.raises(UserError, match='Give the manifest'):
    review.create_app(issues, str(tmp_path / 'x.csv'), folder=root)


def test_a_manifest_naming_images_elsewhere_has_them_shown(tmp_path):
  """Manifest paths may leave its folder ('../img/x.png', absolute ones): the page shows exactly
  the files the manifest lists, and no other."""
  manifest, _ = review_case(str(tmp_path))
  lists = tmp_path / 'lists'
  os.makedirs(lists)
  with open(manifest) as f:
    lines = f.read().splitlines()
  (lists / 'm.csv').write_text('\n'.join([lines[0]] + [
      ('../d/' + line if i % 2 else str(tmp_path / 'd') + '/' + line)
      for i, line in enumerate(lines[1:])]) + '\n')
  issues = str(tmp_path / 'l.csv')
  label_issues.write_csv([{'rank': 1, 'id': '../d/img/1.png', 'fold': 0, 'label': '1',
                           'suggested': '2', 'p_label': 0.1, 'p_suggested': 0.9},
                          {'rank': 2, 'id': str(tmp_path / 'd' / 'img' / '0.png'), 'fold': 0,
                           'label': '0', 'suggested': '2', 'p_label': 0.1, 'p_suggested': 0.9},
                          {'rank': 3, 'id': '../d/labels.csv', 'fold': 0, 'label': '0',
                           'suggested': '2', 'p_label': 0.1, 'p_suggested': 0.9}], issues,
                         label_issues.COLUMNS)
  client = TestClient(review.create_app(issues, str(lists / 'm.csv')), base_url=LOCAL)
  for rank, name in ((1, '1.png'), (2, '0.png')):
    with open(tmp_path / 'd' / 'img' / name, 'rb') as f:
      assert client.get(f'/v1/image/{rank}').content == f.read()
  assert client.get('/v1/image/3').status_code == 404   # a file, but not one the manifest lists


def test_an_unreadable_input_is_not_blamed_on_the_port(tmp_path, capsys, monkeypatch):
  manifest, issues = review_case(str(tmp_path))
  missing = str(tmp_path / 'nonexist.csv')
  assert review.main([f'--issues={issues}', f'--manifest={missing}', '--port=0']) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f'Error: The manifest {missing} does not exist; give the CSV file of path,label rows the '
      'run read (config.data.manifest).']
  assert review.main([f'--issues={missing}', f'--manifest={manifest}', '--port=0']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f'Error: Cannot read the label-issue list {missing}')

  def unreadable(*args, **kwargs):
    raise PermissionError(13, 'Permission denied', str(tmp_path / 'd' / 'img'))
  monkeypatch.setattr(review.relabel, 'open_source', unreadable)   # e.g. a folder's subfolder
  assert review.main([f'--issues={issues}', f'--manifest={manifest}', '--port=0']) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"Error: cannot read {tmp_path / 'd' / 'img'} (Permission denied); give a readable "
      '--issues list and --manifest (or --folder).']


def test_an_apply_that_applies_nothing_keeps_the_earlier_copy(tmp_path):
  manifest, issues = review_case(str(tmp_path))
  client = TestClient(review.create_app(issues, manifest), base_url=LOCAL)
  done = client.post('/v1/apply', json={'ranks': [1]}).json()
  with open(done['output']) as f:
    earlier = f.read()
  response = client.post('/v1/apply', json={'ranks': [2]})   # only the stale row
  assert response.status_code == 400
  assert response.json()['error'] == (
      "None of the 1 chosen row(s) could be applied (rank 2 (img/6.png): labelled '0' in the "
      f"manifest, not '2' as listed), so nothing was written ({done['output']} is kept as it "
      'was); choose rows the manifest still labels as the list does, or search again on this '
      'manifest.')
  with open(done['output']) as f:
    assert f.read() == earlier
