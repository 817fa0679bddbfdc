"""--mode=serve: a bounded loopback load test (good requests answered right, bad ones a 4xx), the
TF-Serving and KServe v2 endpoints, multipart uploads, 503 on a full queue, request IDs and
/metrics, and the server's memory over 5,000 requests."""
import base64
import concurrent.futures
import dataclasses
import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, serve
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env
from tests.test_predict import bomb_png, trained_run, trainer_probabilities

NUM_REQUESTS, CONCURRENCY, DEADLINE_S = 500, 16, 240


def _png(array_HxW, size=None, mode='L', fmt='PNG'):
  img = Image.fromarray(array_HxW).convert(mode)
  if size:
    img = img.resize((size, size), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def _serve_cfg(config, **changes):
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  cfg.max_upload_bytes = 64 * 1024
  cfg.max_pixels = 1_000_000
  cfg.max_batch_size = 8
  cfg.batch_timeout_ms = 20.0
  for k, v in changes.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope='module')
def server(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  clf = inference.classifier(inference.load(workdir, config))
  srv = serve.make_server(clf, _serve_cfg(config)).start()
  srv.trainer_probs = trainer_probabilities(config, workdir, digits.load_arrays('test')[0][:45])
  yield srv, clf
  srv.close()


def _split(url):
  host, port = url.split('//')[1].rsplit(':', 1)
  return host, int(port)


def _request(url, method, path, body=None, headers=None, timeout=30.0, conn=None):
  own = conn is None
  conn = conn or http.client.HTTPConnection(*_split(url), timeout=timeout)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    payload = json.loads(data) if data and 'json' in resp.getheader('Content-Type', '') else {}
    return resp.status, payload
  finally:
    if own:
      conn.close()


def _raw(url, data: bytes, timeout=30.0) -> int:
  """Sends raw bytes (a request http.client would refuse to build); returns the status code."""
  with socket.create_connection(_split(url), timeout=timeout) as s:
    s.sendall(data)
    reply = s.recv(4096).decode('latin-1')
  return int(reply.split()[1])


def _multipart(field, filename, data, content_type='image/png'):
  boundary = 'imgclsboundary7MA4YWxk'
  body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"'
          f'\r\nContent-Type: {content_type}\r\n\r\n').encode() + data + \
      f'\r\n--{boundary}--\r\n'.encode()
  return body, {'Content-Type': f'multipart/form-data; boundary={boundary}'}


def _form(*parts):
  """A multipart body of ``(field, filename or None, data)`` parts; None: a part without a
  filename, as ``curl -F field=<file`` sends it."""
  boundary = 'imgclsboundary7MA4YWxk'
  body = b''
  for field, filename, data in parts:
    name = f'; filename="{filename}"' if filename is not None else ''
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{name}\r\n'
             f'Content-Type: image/png\r\n\r\n').encode() + data + b'\r\n'
  return body + f'--{boundary}--\r\n'.encode(), {
      'Content-Type': f'multipart/form-data; boundary={boundary}'}


class FewClasses:
  """``clf`` cut to its first ``k`` classes (softmax over those logits): a model with fewer
  classes than the default top_k of 5, without training one. Only what the server uses."""

  def __init__(self, clf, k):
    self.clf, self.k, self.max_batch = clf, k, clf.max_batch
    info = dataclasses.replace(clf.trained.info, num_classes=k, class_names=clf.class_names[:k])
    self.trained = dataclasses.replace(clf.trained, info=info)
    self.class_names, self.image_shape, self.step = info.class_names, clf.image_shape, clf.step

  def prepare(self, data, *, max_pixels=None):
    return self.clf.prepare(data, max_pixels=max_pixels)

  def predict_arrays(self, images):
    logits = self.clf.predict_arrays(images)['logits'][:, :self.k]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return {'probabilities': e / e.sum(-1, keepdims=True), 'logits': logits}


def _cases(clf, probs):
  """(name, method, path, body, headers, expected status, expected probs or None) x many.

  ``probs``: the trainer-side probabilities of the first 45 test digits (the exact PNGs)."""
  x, _ = digits.load_arrays('test')
  good = []
  for i in range(40):  # exact 8x8 PNGs (expected probabilities known exactly) ...
    good.append(('png', 'POST', '/v1/classify?top_k=3', _png(x[i, :, :, 0]), {}, 200, probs[i]))
  for i in range(10):  # ... and other sizes, modes, formats (expected: the model on prepare())
    mode, fmt = (('RGB', 'JPEG'), ('RGBA', 'PNG'), ('P', 'GIF'))[i % 3]
    body = _png(x[i, :, :, 0], size=40 + i, mode=mode, fmt=fmt)
    good.append(('other', 'POST', '/v1/classify', body, {'Content-Type': 'image/png'}, 200,
                 clf.predict_arrays(clf.prepare(body)[None])['probabilities'][0]))
  for i in range(40, 45):  # ... and multipart uploads, as `curl -F image=@x.png` sends them
    good.append(('multipart', 'POST', '/v1/classify?top_k=3',
                 *_multipart('image', f'{i}.png', _png(x[i, :, :, 0])), 200, probs[i]))
  big = io.BytesIO()
  Image.new('L', (1200, 1200)).save(big, 'PNG')     # small file, too many pixels
  truncated = good[0][3][:30]
  bad = [
      ('text', 'POST', '/v1/classify', b'hello, not an image', {'Content-Type': 'text/plain'}, 415),
      ('truncated', 'POST', '/v1/classify', truncated, {}, 415),
      ('empty', 'POST', '/v1/classify', b'', {}, 400),
      ('oversize', 'POST', '/v1/classify', b'\x00' * (65 * 1024), {}, 413),
      ('pixels', 'POST', '/v1/classify', big.getvalue(), {}, 413),
      ('top_k', 'POST', '/v1/classify?top_k=zero', good[1][3], {}, 400),
      ('top_k_range', 'POST', '/v1/classify?top_k=0', good[1][3], {}, 400),
      ('form_garbage', 'POST', '/v1/classify', good[2][3],
       {'Content-Type': 'multipart/form-data; boundary=x'}, 400),
      ('form_not_image', 'POST', '/v1/classify', *_multipart('image', 'a.txt', b'hi', 'text/plain'),
       415),
      ('path', 'POST', '/v2/predict', good[3][3], {}, 404),
      ('get_classify', 'GET', '/v1/classify', None, {}, 405),
      ('delete', 'DELETE', '/v1/model', None, {}, 405),
      ('tfs_not_json', 'POST', '/v1/models/imgcls:predict', b'{nope', {}, 400),
      ('tfs_no_model', 'POST', '/v1/models/other:predict', b'{}', {}, 404),
  ]
  return good, [b + (None,) for b in bad]


def test_bounded_load_test_with_malformed_requests(server):
  srv, clf = server
  good, bad = _cases(clf, srv.trainer_probs)
  rng = np.random.default_rng(0)
  # 500 requests: ~80% well-formed, ~20% malformed, shuffled, 16 at a time.
  plan = ([good[i] for i in rng.integers(0, len(good), 400)] +
          [bad[i % len(bad)] for i in range(100)])
  plan = [plan[i] for i in rng.permutation(len(plan))]
  raw_bad = [
      (b'POST /v1/classify HTTP/1.1\r\nHost: x\r\n\r\n', 411),                     # no length
      (b'POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n', 400),
      (b'POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n', 411),
      (b'BREW /pot HTCPCP/1.0\r\n\r\n', 400),                                        # bad version
      (b'HEAD /v1/classify HTTP/1.1\r\nHost: x\r\n\r\n', 405),                       # POST only
      (b'garbage\r\n\r\n', 400),
  ]
  before = sum(n * c for n, c in srv.batcher.batch_sizes.items())
  start = time.monotonic()

  def one(case):
    name, method, path, body, headers, status, expected = case
    got_status, payload = _request(srv.url, method, path, body, headers)
    return name, status, expected, got_status, payload, path

  with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
    futures = [pool.submit(one, c) for c in plan]
    futures += [pool.submit(lambda r: ('raw', r[1], None, _raw(srv.url, r[0]), {}, ''), r)
                for r in raw_bad]
    done, pending = concurrent.futures.wait(futures, timeout=DEADLINE_S)
  elapsed = time.monotonic() - start
  assert not pending, f'{len(pending)} requests unanswered after {DEADLINE_S} s'
  ok = 0
  for f in done:
    name, status, expected, got_status, payload, path = f.result()
    assert got_status == status, (name, got_status, payload)
    if status == 200:
      ok += 1
      k = 3 if 'top_k=3' in path else 5
      preds = payload['predictions']
      assert [p['index'] for p in preds] == list(np.argsort(-expected, kind='stable')[:k]), name
      assert all(p['class'] == clf.class_names[p['index']] for p in preds)
      np.testing.assert_allclose([p['probability'] for p in preds],
                                 expected[[p['index'] for p in preds]], rtol=1e-5, atol=1e-7)
    elif name != 'raw':
      error = payload.get('error')
      assert isinstance(error, str) and error.endswith('.') and '\n' not in error, (name, payload)
  # Concurrent requests were batched, and the service is still healthy.
  assert max(srv.batcher.batch_sizes) > 1, srv.batcher.batch_sizes
  assert sum(n * c for n, c in srv.batcher.batch_sizes.items()) - before == ok == 400
  assert _request(srv.url, 'GET', '/healthz') == (200, {'status': 'ok'})
  print(f'{len(futures)} requests in {elapsed:.1f} s; batch sizes {dict(srv.batcher.batch_sizes)}')


def test_an_image_past_pils_decompression_bomb_limit_is_413_naming_its_size(server):
  srv, _ = server
  bomb = bomb_png(20000, 20000)   # ~50 KB: within max_upload_bytes, 400 M pixels
  status, payload = _request(srv.url, 'POST', '/v1/classify', bomb)
  assert status == 413, payload
  assert payload['error'] == ('The body is an image of 20000x20000 pixels, more than the limit of '
                              '1000000; send a smaller image.')


def test_top_k_above_the_class_count_is_clamped_and_bad_values_are_400(server):
  """As predict clamps config.predict.top_k: ?top_k over the 10 classes lists all 10 (it was a
  400, so the page's fixed top_k=5 failed on every model of fewer than 5 classes); values that are
  not integers of at least 1 stay a 400 naming top_k."""
  srv, _ = server
  x, _ = digits.load_arrays('test')
  want = list(np.argsort(-srv.trainer_probs[0], kind='stable'))
  for k, n in (('11', 10), ('1000', 10), ('10', 10), ('3', 3)):
    status, payload = _request(srv.url, 'POST', f'/v1/classify?top_k={k}', _png(x[0, :, :, 0]))
    assert status == 200, (k, payload)
    assert [p['index'] for p in payload['predictions']] == want[:n], k
  for k in ('0', '-1', '2.5', 'zero', ''):
    status, payload = _request(srv.url, 'POST', f'/v1/classify?top_k={k}', _png(x[0, :, :, 0]))
    assert status == 400 and payload['error'].startswith('top_k must be'), (k, payload)
    assert f"got '{k}'" in payload['error'], payload


def test_config_top_k_above_the_class_count_is_clamped_and_reported(server, tmp_path_factory,
                                                                    tfds_dir):
  """config.serve.top_k=50 on 10 classes answers and reports (/v1/model) 10, and a 3-class model
  with the default top_k of 5 answers ?top_k=5 (the web page's old request) with its 3 classes."""
  _, clf = server
  config, _, _ = trained_run(tmp_path_factory, tfds_dir)
  x, _ = digits.load_arrays('test')
  three = FewClasses(clf, 3)
  for model, top_k, n in ((clf, 50, 10), (three, 5, 3)):
    srv = serve.make_server(model, _serve_cfg(config, top_k=top_k), warm_up=False).start()
    try:
      status, info = _request(srv.url, 'GET', '/v1/model')
      assert status == 200 and info['top_k'] == n and len(info['class_names']) == n, info
      for path in ('/v1/classify', '/v1/classify?top_k=5'):
        status, payload = _request(srv.url, 'POST', path, _png(x[0, :, :, 0]))
        assert status == 200, (path, payload)
        probs = model.predict_arrays(model.prepare(_png(x[0, :, :, 0]))[None])['probabilities'][0]
        assert len(probs) == len(model.class_names)
        k = n if path == '/v1/classify' else min(5, n)
        assert [p['index'] for p in payload['predictions']] == list(
            np.argsort(-probs, kind='stable')[:k]), (path, payload)
    finally:
      srv.close()


def test_unknown_and_repeated_query_parameters_are_400(server):
  """?topk=2 (a typo) was ignored and top_k=1&top_k=2 took the last: both are a 400 naming the
  parameter (and the known one); a parameter not meant for top_k is still ignored."""
  srv, _ = server
  x, _ = digits.load_arrays('test')
  body = _png(x[0, :, :, 0])
  for query, words in (('topk=2', ["'topk'", 'top_k']), ('top_k=2&k=1', ["'k'", 'top_k']),
                       ('top_k=1&top_k=2', ['top_k', '2 times', 'once'])):
    status, payload = _request(srv.url, 'POST', f'/v1/classify?{query}', body)
    assert status == 400, (query, payload)
    assert all(w in payload['error'] for w in words), (query, payload)
    assert payload['error'].endswith('.') and payload['error'].count('. ') == 0, payload
  assert _request(srv.url, 'POST', '/v1/classify?top_k=2', body)[0] == 200
  # Parameters meant for something else (a cache-buster, a tracker) are left alone.
  status, payload = _request(srv.url, 'POST', '/v1/classify?top_k=2&_=1712&utm_source=x&token=t'
                             '&key=a&format=json&v=2&n=3&pk=1&topic=x', body)
  assert status == 200 and len(payload['predictions']) == 2


def test_multipart_errors_say_what_the_form_lacks(server):
  """Any one file field is classified (the one named image where there are several): the errors
  say so, not "named image" alone; a part without a filename (curl -F image=<file) is named as
  such, with the fix (-F image=@file)."""
  srv, _ = server
  x, _ = digits.load_arrays('test')
  png = _png(x[0, :, :, 0])
  status, payload = _request(srv.url, 'POST', '/v1/classify', *_form(('photo', 'a.png', png)))
  assert status == 200, payload
  status, payload = _request(srv.url, 'POST', '/v1/classify',
                             *_form(('a', 'a.png', png), ('image', 'b.png', png)))
  assert status == 200, payload
  for parts, words in [
      ([('image', None, png)], ["form field 'image' has no filename", '-F image=@']),
      ([('a', 'a.png', png), ('b', 'b.png', png)], ['2 files', 'none named image']),
      ([('image', 'a.png', png), ('image', 'b.png', png)], ['2 files named image']),
      ([], ['no file'])]:
    status, payload = _request(srv.url, 'POST', '/v1/classify', *_form(*parts))
    assert status == 400, (parts, payload)
    assert all(w in payload['error'] for w in words), (parts, payload)
    assert 'named image (curl' not in payload['error'], payload
  status, payload = _request(srv.url, 'POST', '/v1/classify', png,
                             {'Content-Type': 'multipart/form-data; boundary=x'})
  assert status == 400 and 'named image' not in payload['error'], payload


def _metric(url, name):
  conn = http.client.HTTPConnection(*_split(url), timeout=30)
  conn.request('GET', '/metrics')
  text = conn.getresponse().read().decode()
  conn.close()
  found = re.search(rf'^{re.escape(name)} (\S+)$', text, re.M)
  return float(found.group(1)) if found else 0.0


def test_a_client_that_disconnects_mid_upload_is_499_not_a_500(server, caplog):
  """A client that sends part of its Content-Length and closes (raw body, multipart, and one over
  max_upload_bytes that the server drains) is one log line and code 499 in the metrics: no
  ERROR traceback, no 500 (it was both: starlette's ClientDisconnect reached the 500 handler)."""
  srv, _ = server
  key = 'imgcls_requests_total{endpoint="/v1/classify",code="%d"}'
  before = {c: _metric(srv.url, key % c) for c in (499, 500, 400)}
  form, headers = _form(('image', 'a.png', b'\x89PNG' + b'\x00' * 5000))
  requests = [
      (b'Content-Type: image/png\r\nContent-Length: 60000\r\n', b'\x89PNG' + b'\x00' * 5000),
      (f'Content-Type: {headers["Content-Type"]}\r\nContent-Length: 60000\r\n'.encode(),
       form[:3000]),
      (b'Content-Length: 100000\r\n', b'\x00' * 5000)]      # > 64 KiB: drained, then 413
  with caplog.at_level(logging.INFO, logger='imgcls_jax.serve'):
    for head, partial in requests:
      with socket.create_connection(_split(srv.url), timeout=30) as s:
        s.sendall(b'POST /v1/classify HTTP/1.1\r\nHost: x\r\n' + head + b'\r\n' + partial)
        time.sleep(0.2)   # the server is reading the body when the client goes
    deadline = time.monotonic() + 30
    while (_metric(srv.url, key % 499) - before[499] < len(requests) and
           time.monotonic() < deadline):
      time.sleep(0.05)
  after = {c: _metric(srv.url, key % c) for c in (499, 500, 400)}
  assert after[499] - before[499] == len(requests), (before, after)
  assert after[500] == before[500] and after[400] == before[400], (before, after)
  mine = [r for r in caplog.records if r.name.startswith('imgcls_jax')]
  assert not [r for r in mine if r.levelno >= logging.ERROR or r.exc_info], [
      r.getMessage() for r in mine]
  lines = [r.getMessage() for r in mine if '-> 499' in r.getMessage()]
  assert len(lines) == len(requests) and all('closed the connection' in m for m in lines), lines
  assert _request(srv.url, 'GET', '/healthz') == (200, {'status': 'ok'})


def test_tf_serving_rest_api(server):
  """TF-Serving's REST shapes; predictions equal the trainer's probabilities (an independent
  oracle)."""
  srv, clf = server
  x, _ = digits.load_arrays('test')
  status, info = _request(srv.url, 'GET', '/v1/models/imgcls')
  assert status == 200 and info == {'model_version_status': [{
      'version': str(clf.step), 'state': 'AVAILABLE',
      'status': {'error_code': 'OK', 'error_message': ''}}]}
  status, meta = _request(srv.url, 'GET', '/v1/models/imgcls/metadata')
  sig = meta['metadata']['signature_def']['signature_def']['serving_default']
  assert status == 200 and sig['inputs']['images']['dtype'] == 'DT_UINT8'
  assert [d['size'] for d in sig['inputs']['images']['tensor_shape']['dim']] == ['-1', '8', '8',
                                                                                 '1']
  b64 = [base64.b64encode(_png(x[i, :, :, 0])).decode() for i in range(3)]
  body = {'instances': [{'b64': b64[0]}, {'images': {'b64': b64[1]}}, {'b64': b64[2]}]}
  status, out = _request(srv.url, 'POST', '/v1/models/imgcls:predict', json.dumps(body),
                         {'Content-Type': 'application/json'})
  assert status == 200 and len(out['predictions']) == 3
  got = np.array([p['probabilities'] for p in out['predictions']])
  np.testing.assert_allclose(got, srv.trainer_probs[:3], rtol=1e-5, atol=1e-7)
  logits = np.array([p['logits'] for p in out['predictions']])  # softmax(logits) == probabilities
  np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), got,
                             rtol=1e-5, atol=1e-7)
  # The signature's own input, uint8 pixels (HxWxC, or HxW for one channel): the same answers.
  body = {'instances': [x[0].tolist(), {'images': x[1, :, :, 0].tolist()}, {'b64': b64[2]}]}
  status, out = _request(srv.url, 'POST', '/v1/models/imgcls:predict', json.dumps(body),
                         {'Content-Type': 'application/json'})
  assert status == 200, out
  np.testing.assert_allclose([p['probabilities'] for p in out['predictions']],
                             srv.trainer_probs[:3], rtol=1e-5, atol=1e-7)
  # TF-Serving's versioned path: the version is the checkpoint step served (another is a 404).
  status, same = _request(srv.url, 'POST', f'/v1/models/imgcls/versions/{clf.step}:predict',
                          json.dumps(body), {'Content-Type': 'application/json'})
  assert status == 200 and same == out
  status, err = _request(srv.url, 'POST', '/v1/models/imgcls/versions/999999:predict',
                         json.dumps(body), {'Content-Type': 'application/json'})
  assert status == 404 and f'serves version {clf.step}' in err['error']
  for body, status, words in [
      ({'instances': [x[0, :4].tolist()]}, 400, 'Instance 0 must be 8x8x1 integers 0..255'),
      ({'instances': [(x[0] * 1.5).tolist()]}, 400, 'Instance 0 must be 8x8x1 integers'),
      ({'instances': [(x[0].astype(int) + 300).tolist()]}, 400, 'integers 0..255'),
      ({'instances': [[[[True]] + row[1:] for row in x[0].tolist()]]}, 400,
       'Instance 0 must be 8x8x1 integers 0..255'),   # JSON true read as 1 before
      ({'instances': []}, 400, 'no non-empty "instances"'),
      ({'inputs': {'b64': b64[0]}}, 400, 'no non-empty "instances"'),
      ({'instances': [{'b64': '***'}]}, 400, 'Instance 0 is not valid base64'),
      ({'instances': [{'b64': b64[0]}, 'x']}, 400, 'Instance 1 is neither {"b64"'),
      ({'instances': [{'b64': base64.b64encode(b'text').decode()}]}, 415, 'Instance 0 is not a'),
      ({'instances': [{'b64': b64[0]}], 'signature_name': 'other'}, 400, 'signature_name')]:
    got_status, payload = _request(srv.url, 'POST', '/v1/models/imgcls:predict',
                                   json.dumps(body))
    assert got_status == status and words in payload['error'], (body, payload)
  assert _request(srv.url, 'GET', '/v1/models/other')[0] == 404


def test_kserve_v2_endpoints(server):
  srv, clf = server
  x, _ = digits.load_arrays('test')
  assert _request(srv.url, 'GET', '/v2/health/live') == (200, {'live': True})
  assert _request(srv.url, 'GET', '/v2/health/ready') == (200, {'ready': True})
  assert _request(srv.url, 'GET', '/v2/models/imgcls/ready') == (200, {'name': 'imgcls',
                                                                         'ready': True})
  status, meta = _request(srv.url, 'GET', '/v2/models/imgcls')
  assert status == 200 and meta['inputs'] == [{'name': 'images', 'datatype': 'UINT8',
                                               'shape': [-1, 8, 8, 1]}]
  tensor = {'name': 'images', 'datatype': 'UINT8', 'shape': [5, 8, 8, 1],
            'data': x[:5].ravel().tolist()}
  status, out = _request(srv.url, 'POST', '/v2/models/imgcls/infer',
                         json.dumps({'id': 'r1', 'inputs': [tensor]}))
  assert status == 200 and out['id'] == 'r1'
  probs = next(o for o in out['outputs'] if o['name'] == 'probabilities')
  assert probs['shape'] == [5, 10] and probs['datatype'] == 'FP32'
  np.testing.assert_allclose(np.reshape(probs['data'], (5, 10)), srv.trainer_probs[:5],
                             rtol=1e-5, atol=1e-7)
  for change in ({'shape': [5, 9, 8, 1]}, {'datatype': 'FP32'}, {'data': [1, 2, 3]},
                 {'data': [300] * 320}):
    status, payload = _request(srv.url, 'POST', '/v2/models/imgcls/infer',
                               json.dumps({'inputs': [{**tensor, **change}]}))
    assert status == 400 and payload['error'].startswith('The input tensor'), (change, payload)


def test_deeply_nested_json_is_400(server):
  """Nesting deeper than the JSON parser recurses is a 400 with a sentence, not a 500."""
  srv, _ = server
  for path in ('/v1/models/imgcls:predict', '/v2/models/imgcls/infer'):
    status, payload = _request(srv.url, 'POST', path, b'[' * 20000)
    assert status == 400 and 'nested too deeply' in payload['error'], (path, payload)


def test_v2_numbers_out_of_range_and_non_integer_dimensions_are_400(server):
  srv, _ = server
  x, _ = digits.load_arrays('test')
  tensor = {'name': 'images', 'datatype': 'UINT8', 'shape': [1, 8, 8, 1],
            'data': x[:1].ravel().tolist()}
  for change in ({'data': [2**70] * 64}, {'data': [1e300] * 64}, {'data': [1.5] * 64},
                 {'data': [True] + x[0].ravel().tolist()[1:]},   # read as the pixel 1 before
                 {'shape': [True, 8, 8, 1]}, {'shape': [1, 8, 8, True]},
                 {'shape': [1, 8.0, 8, 1]}, {'shape': [2**62, 8, 8, 1], 'data': []}):
    status, payload = _request(srv.url, 'POST', '/v2/models/imgcls/infer',
                               json.dumps({'inputs': [{**tensor, **change}]}))
    assert status == 400 and payload['error'].startswith('The input tensor'), (change, payload)
  assert _request(srv.url, 'POST', '/v2/models/imgcls/infer',
                  json.dumps({'inputs': [tensor]}))[0] == 200


def test_more_images_than_the_queue_holds_is_413_before_any_is_queued(server, tmp_path_factory,
                                                                       tfds_dir):
  """Such a request could never be queued whole (a retry cannot help): 413 naming the limit, and
  none of its images reaches the model; a request of max_queue images is served."""
  _, clf = server
  config, _, _ = trained_run(tmp_path_factory, tfds_dir)
  srv = serve.make_server(clf, _serve_cfg(config, max_queue=4), warm_up=False).start()
  x, _ = digits.load_arrays('test')
  instances = [{'b64': base64.b64encode(_png(x[i, :, :, 0])).decode()} for i in range(5)]
  tensor = {'name': 'images', 'datatype': 'UINT8', 'shape': [5, 8, 8, 1],
            'data': x[:5].ravel().tolist()}
  try:
    for path, body in [('/v1/models/imgcls:predict', {'instances': instances}),
                       ('/v2/models/imgcls/infer', {'inputs': [tensor]})]:
      status, payload = _request(srv.url, 'POST', path, json.dumps(body))
      assert status == 413 and 'send at most 4 images' in payload['error'], (path, payload)
    time.sleep(0.1)  # the model thread would have taken anything queued by now
    assert not srv.batcher.batch_sizes
    status, out = _request(srv.url, 'POST', '/v1/models/imgcls:predict',
                           json.dumps({'instances': instances[:4]}))
    assert status == 200 and len(out['predictions']) == 4
  finally:
    srv.close()


def test_port_outside_0_to_65535_is_refused(server, tmp_path_factory, tfds_dir):
  _, clf = server
  config, _, _ = trained_run(tmp_path_factory, tfds_dir)
  for port in (70000, 65536, -1):
    with pytest.raises(UserError, match=rf'^config\.serve\.port must be from 0 to 65535 .*got '
                       rf'{port}\.$'):
      serve.make_server(clf, _serve_cfg(config, port=port), warm_up=False)


@pytest.mark.parametrize('key, value, match', [
    ('keep_alive_s', -1, r'config\.serve\.keep_alive_s must be >= 0'),
    ('model_name', 'a/b', r"config\.serve\.model_name='a/b' must be one URL path segment")])
def test_keep_alive_and_model_name_are_checked(server, tmp_path_factory, tfds_dir, key, value,
                                               match):
  """Both were accepted: a negative keep-alive, and a name its own /v1/models/<name> routes could
  never match."""
  _, clf = server
  config, _, _ = trained_run(tmp_path_factory, tfds_dir)
  with pytest.raises(UserError, match=match):
    serve.make_server(clf, _serve_cfg(config, **{key: value}), warm_up=False)


def test_model_endpoint_and_page(server):
  srv, clf = server
  status, info = _request(srv.url, 'GET', '/v1/model')
  assert status == 200 and info['class_names'] == list(clf.class_names)
  assert info['input_shape'] == [8, 8, 1] and info['checkpoint_step'] == clf.step
  conn = http.client.HTTPConnection(*_split(srv.url), timeout=30)
  conn.request('GET', '/')
  resp = conn.getresponse()
  page = resp.read().decode()
  conn.close()
  assert resp.status == 200 and resp.getheader('Content-Type').startswith('text/html')
  assert '<input id="file" type="file"' in page
  # Offline: nothing is fetched from another host (no CDN, no absolute URLs).
  assert not re.search(r'''(src|href)\s*=\s*["']?(https?:)?//''', page), 'page loads a remote file'
  assert not re.search(r'''fetch\(\s*["'`](https?:)?//''', page)
  assert _request(srv.url, 'GET', '/openapi.json')[0] == 200
  assert _request(srv.url, 'GET', '/docs')[0] == 200


def test_head_is_answered_as_get_without_a_body(server):
  """Uptime monitors and load balancers probe with HEAD (it was a 405): the GET's status and
  headers, no body, and the connection stays usable."""
  srv, _ = server
  conn = http.client.HTTPConnection(*_split(srv.url), timeout=30)
  for path, status, kind in (('/', 200, 'text/html'), ('/healthz', 200, 'application/json'),
                             ('/v2/health/ready', 200, 'application/json'),
                             ('/v1/classify', 405, 'application/json'),
                             ('/nowhere', 404, 'application/json')):
    conn.request('GET', path)
    get = conn.getresponse()
    body = get.read()
    conn.request('HEAD', path)
    head = conn.getresponse()
    assert (head.status, head.read()) == (status, b''), path
    assert get.status == status and head.getheader('Content-Type').startswith(kind), path
    assert int(head.getheader('Content-Length')) == len(body), path
  conn.close()


def test_request_ids_and_metrics(server):
  srv, _ = server
  x, _ = digits.load_arrays('test')

  def get(path, headers=None, body=None, method='GET'):
    conn = http.client.HTTPConnection(*_split(srv.url), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data

  resp, _ = get('/healthz', {'X-Request-ID': 'client-id-42'})
  assert resp.getheader('X-Request-ID') == 'client-id-42'
  ids = {get('/healthz')[0].getheader('X-Request-ID') for _ in range(5)}
  assert len(ids) == 5 and all(re.fullmatch(r'[0-9a-f]{16}', i) for i in ids)

  def counters():
    text = get('/metrics')[1].decode()
    found = dict(re.findall(r'^(imgcls_\w+(?:\{[^}]*\})?) (\S+)$', text, re.M))
    return {k: float(v) for k, v in found.items()}

  before = counters()
  for i in range(7):
    assert get('/v1/classify', body=_png(x[i, :, :, 0]), method='POST')[0].status == 200
  assert get('/v1/classify', body=b'nope', method='POST')[0].status == 415
  after = counters()
  key = 'imgcls_requests_total{endpoint="/v1/classify",code="%d"}'
  assert after[key % 200] - before.get(key % 200, 0) == 7
  assert after[key % 415] - before.get(key % 415, 0) == 1
  count = 'imgcls_request_duration_seconds_count{endpoint="/v1/classify"}'
  assert after[count] - before.get(count, 0) == 8
  inf = 'imgcls_request_duration_seconds_bucket{endpoint="/v1/classify",le="+Inf"}'
  assert after[inf] == after[count]
  images = sum(n * c for n, c in srv.batcher.batch_sizes.items())
  assert after['imgcls_images_total'] == images
  assert after['imgcls_batch_size_count'] == sum(srv.batcher.batch_sizes.values())
  assert after['imgcls_batch_size_sum'] == images


def test_full_queue_is_503_and_the_service_recovers(tmp_path_factory, tfds_dir):
  """The model thread is held inside a batch; one request waits in the queue (max_queue=1);
  the next is refused with 503 and Retry-After; once the model is released both finish."""
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  clf = inference.classifier(inference.load(workdir, config))
  srv = serve.make_server(clf, _serve_cfg(config, max_queue=1, max_batch_size=1,
                                          batch_timeout_ms=0.0)).start()
  entered, release = threading.Event(), threading.Event()
  real = clf.predict_arrays

  def held(images):
    entered.set()
    release.wait(60)
    return real(images)
  clf.predict_arrays = held
  x, _ = digits.load_arrays('test')
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(_request, srv.url, 'POST', '/v1/classify', _png(x[0, :, :, 0]))
      assert entered.wait(30)
      second = pool.submit(_request, srv.url, 'POST', '/v1/classify', _png(x[1, :, :, 0]))
      deadline = time.monotonic() + 30
      while srv.batcher.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
      conn = http.client.HTTPConnection(*_split(srv.url), timeout=30)
      conn.request('POST', '/v1/classify', body=_png(x[2, :, :, 0]))
      resp = conn.getresponse()
      payload = json.loads(resp.read())
      conn.close()
      assert resp.status == 503 and resp.getheader('Retry-After') == '1'
      assert payload == {'error': 'The service is overloaded; retry shortly.'}
      release.set()
      assert first.result(60)[0] == 200 and second.result(60)[0] == 200
    assert _request(srv.url, 'POST', '/v1/classify', _png(x[3, :, :, 0]))[0] == 200
  finally:
    release.set()
    srv.close()


def _v2_body(images_NxHxWxC):
  return json.dumps({'inputs': [{'name': 'images', 'datatype': 'UINT8',
                                 'shape': list(images_NxHxWxC.shape),
                                 'data': images_NxHxWxC.ravel().tolist()}]})


def _v2_probs(payload):
  out = next(o for o in payload['outputs'] if o['name'] == 'probabilities')
  return np.reshape(out['data'], out['shape'])


def test_a_request_refused_with_503_leaves_none_of_its_images_queued(server, tmp_path_factory,
                                                                      tfds_dir):
  """A request's images are queued all or none. The model is held inside a batch of image 0 and
  images 1-2 wait in the queue (max_queue=3): a request of images 3-4 would fit only in part, so
  it is refused with 503 and queues nothing (its first image used to be queued and computed for
  no one). The model sees each accepted image exactly once, and the answers are the trainer's."""
  srv0, _ = server
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  clf = inference.classifier(inference.load(workdir, config))
  srv = serve.make_server(clf, _serve_cfg(config, max_queue=3, max_batch_size=1,
                                          batch_timeout_ms=0.0)).start()
  entered, release, seen = threading.Event(), threading.Event(), []
  real = clf.predict_arrays

  def held(images):
    seen.append(np.array(images))
    entered.set()
    release.wait(60)
    return real(images)
  clf.predict_arrays = held
  x, _ = digits.load_arrays('test')
  path = '/v2/models/imgcls/infer'
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(_request, srv.url, 'POST', path, _v2_body(x[0:1]))
      assert entered.wait(30)
      second = pool.submit(_request, srv.url, 'POST', path, _v2_body(x[1:3]))
      deadline = time.monotonic() + 30
      while srv.batcher.queue_depth < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      assert srv.batcher.queue_depth == 2
      status, payload = _request(srv.url, 'POST', path, _v2_body(x[3:5]))
      assert (status, payload) == (503, {'error': 'The service is overloaded; retry shortly.'})
      assert srv.batcher.queue_depth == 2  # nothing of the refused request was left queued
      release.set()
      for f, rows in ((first, slice(0, 1)), (second, slice(1, 3))):
        status, payload = f.result(60)
        assert status == 200, payload
        np.testing.assert_allclose(_v2_probs(payload), srv0.trainer_probs[rows], rtol=1e-5,
                                   atol=1e-7)
    status, payload = _request(srv.url, 'POST', path, _v2_body(x[3:5]))  # the retry is served
    assert status == 200, payload
    np.testing.assert_allclose(_v2_probs(payload), srv0.trainer_probs[3:5], rtol=1e-5, atol=1e-7)
  finally:
    release.set()
    srv.close()  # runs whatever is still queued, so `seen` is final
  # Each accepted image reached the model once, in order; the refused request's never did.
  np.testing.assert_array_equal(np.concatenate(seen), x[:5])
  assert sum(n * c for n, c in srv.batcher.batch_sizes.items()) == 5


def test_batcher_admits_a_request_all_or_none():
  """Batcher.submit_all queues every image of a request or none (Overloaded), and while a batch
  fills the queue takes new images; close() runs what is queued."""
  class Model:  # held until released; 'probabilities' of an image = its pixel sum
    def __init__(self):
      self.entered, self.release, self.seen = threading.Event(), threading.Event(), []

    def predict_arrays(self, images):
      self.seen.append(images.copy())
      self.entered.set()
      self.release.wait(30)
      return {'probabilities': images.reshape(len(images), -1).sum(1, dtype=np.float32),
              'logits': np.zeros(len(images), np.float32)}

  model = Model()
  b = serve.Batcher(model, max_batch_size=2, timeout_s=0.0, max_queue=3)
  img = [np.full((2, 2, 1), i, np.uint8) for i in range(8)]
  try:
    held = b.submit(img[0])
    assert model.entered.wait(30)
    queued = b.submit_all(img[1:3])
    with pytest.raises(serve.Overloaded):
      b.submit_all(img[3:5])                 # 2 + 2 > 3: neither image is queued
    assert b.queue_depth == 2
    last = b.submit_all(img[5:6])            # 2 + 1 <= 3 still fits
    assert b.queue_depth == 3
    with pytest.raises(serve.Overloaded):
      b.submit(img[6])
    model.release.set()
    results = [f.result(30)['probabilities'] for f in [held, *queued, *last]]
    assert results == [4 * i for i in (0, 1, 2, 5)]
  finally:
    model.release.set()
    b.close()
  assert [s[:, 0, 0, 0].tolist() for s in model.seen] == [[0], [1, 2], [5]]
  with pytest.raises(serve.Overloaded):  # a closed batcher takes no more work
    b.submit(img[7])


def _rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='reads RSS from Linux /proc')
def test_memory_does_not_grow_over_5000_requests(server):
  """RSS of the process (server and clients) after 5,000 more requests grows <= 50 MiB. Each
  request uploads a ~48 KB image, so keeping any per-request buffer would exceed that."""
  srv, _ = server
  rng = np.random.default_rng(0)
  bodies = [_png(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), mode='RGB')
            for _ in range(8)]
  assert min(map(len, bodies)) > 40_000

  def client(n, offset):
    conn = http.client.HTTPConnection(*_split(srv.url), timeout=30)
    try:
      for i in range(n):
        status, _ = _request(srv.url, 'POST', '/v1/classify?top_k=1',
                             bodies[(i + offset) % len(bodies)], conn=conn)
        assert status == 200
    finally:
      conn.close()

  def run(total, workers=8):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for f in [pool.submit(client, total // workers, w) for w in range(workers)]:
        f.result()

  run(400)  # warm up: thread pools, allocator arenas, connection buffers
  before, start = _rss_bytes(), time.monotonic()
  run(5000)
  grown = (_rss_bytes() - before) / 2**20
  print(f'5000 requests in {time.monotonic() - start:.1f} s; RSS {before / 2**20:.0f} MiB, '
        f'+{grown:.1f} MiB')
  assert grown <= 50, f'RSS grew by {grown:.1f} MiB over 5000 requests'
  assert _request(srv.url, 'GET', '/healthz')[0] == 200


def test_serve_mode_cli_starts_answers_and_stops_on_sigterm(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'imgcls_jax.main', '--mode=serve',
       f'--config={REPO}/configs/default.py', f'--workdir={workdir}', '--config.serve.port=0',
       '--config.serve.max_batch_size=4'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(1), cwd=REPO)
  try:
    line, deadline = '', time.monotonic() + 240
    while 'Serving' not in line and time.monotonic() < deadline and proc.poll() is None:
      line = proc.stdout.readline()
    url = re.search(r'(http://127\.0\.0\.1:\d+)', line)
    assert url, (line, proc.poll())
    x, _ = digits.load_arrays('test')
    status, payload = _request(url.group(1), 'POST', '/v1/classify?top_k=2', _png(x[0, :, :, 0]))
    assert status == 200 and len(payload['predictions']) == 2
    assert _request(url.group(1), 'POST', '/v1/classify', b'nope')[0] == 415
    assert _request(url.group(1), 'GET', '/v2/health/ready') == (200, {'ready': True})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
