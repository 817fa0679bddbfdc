"""--mode=serve, the HTTP API's answers: a bounded loopback load test (good requests answered
right, bad ones a 4xx), top_k and query parameters, multipart uploads, request IDs and /metrics,
and the CLI that starts and stops the server. The shared request helpers and the module's
``server`` live here; the TF-Serving / KServe v2 endpoints are in test_serve_endpoints.py, the
queue, upload and memory limits in test_serve_limits.py."""
import concurrent.futures
import dataclasses
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, serve
from imgcls_jax.data import digits
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


def _v2_body(images_NxHxWxC):
  return json.dumps({'inputs': [{'name': 'images', 'datatype': 'UINT8',
                                 'shape': list(images_NxHxWxC.shape),
                                 'data': images_NxHxWxC.ravel().tolist()}]})


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
