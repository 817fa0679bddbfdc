"""--mode=serve: a bounded loopback load test (good requests answered right, bad ones a 4xx)."""
import concurrent.futures
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
from tests.test_predict import trained_run, trainer_probabilities

NUM_REQUESTS, CONCURRENCY, DEADLINE_S = 500, 16, 240


def _png(array_HxW, size=None, mode='L', fmt='PNG'):
  img = Image.fromarray(array_HxW).convert(mode)
  if size:
    img = img.resize((size, size), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


@pytest.fixture(scope='module')
def server(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  cfg.max_upload_bytes = 64 * 1024
  cfg.max_pixels = 1_000_000
  cfg.max_batch_size = 8
  cfg.batch_timeout_ms = 20.0
  clf = inference.classifier(inference.load(workdir, config))
  srv = serve.make_server(clf, cfg).start()
  srv.trainer_probs = trainer_probabilities(config, workdir, digits.load_arrays('test')[0][:40])
  yield srv, clf
  srv.close()


def _request(url, method, path, body=None, headers=None, timeout=30.0):
  host, port = url.split('//')[1].split(':')
  conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b'{}')
  finally:
    conn.close()


def _raw(url, data: bytes, timeout=30.0) -> int:
  """Sends raw bytes (a request http.client would refuse to build); returns the status code."""
  host, port = url.split('//')[1].split(':')
  with socket.create_connection((host, int(port)), timeout=timeout) as s:
    s.sendall(data)
    reply = s.recv(4096).decode('latin-1')
  return int(reply.split()[1])


def _cases(clf, probs):
  """(name, method, path, body, headers, expected status, expected probs or None) x many.

  ``probs``: the trainer-side probabilities of the first 40 test digits (the exact PNGs)."""
  x, _ = digits.load_arrays('test')
  good = []
  for i in range(40):  # exact 8x8 PNGs (expected probabilities known exactly) ...
    good.append(('png', 'POST', '/v1/classify?top_k=3', _png(x[i, :, :, 0]), {}, 200, probs[i]))
  for i in range(10):  # ... and other sizes, modes, formats (expected: the model on prepare())
    mode, fmt = (('RGB', 'JPEG'), ('RGBA', 'PNG'), ('P', 'GIF'))[i % 3]
    body = _png(x[i, :, :, 0], size=40 + i, mode=mode, fmt=fmt)
    good.append(('other', 'POST', '/v1/classify', body, {'Content-Type': 'image/png'}, 200,
                 clf.predict_arrays(clf.prepare(body)[None])['probabilities'][0]))
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
      ('top_k_range', 'POST', '/v1/classify?top_k=11', good[1][3], {}, 400),
      ('multipart', 'POST', '/v1/classify', good[2][3],
       {'Content-Type': 'multipart/form-data; boundary=x'}, 415),
      ('path', 'POST', '/v2/predict', good[3][3], {}, 404),
      ('get_classify', 'GET', '/v1/classify', None, {}, 405),
      ('delete', 'DELETE', '/v1/model', None, {}, 405),
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
      (b'HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n', 405),                           # no handler
  ]
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
  for f in done:
    name, status, expected, got_status, payload, path = f.result()
    assert got_status == status, (name, got_status, payload)
    if status == 200:
      k = 3 if 'top_k=3' in path else 5
      preds = payload['predictions']
      assert [p['index'] for p in preds] == list(np.argsort(-expected, kind='stable')[:k]), name
      assert all(p['class'] == clf.class_names[p['index']] for p in preds)
      np.testing.assert_allclose([p['probability'] for p in preds],
                                 expected[[p['index'] for p in preds]], rtol=1e-5, atol=1e-7)
    elif status != 200 and name != 'raw':
      assert isinstance(payload.get('error'), str) and payload['error'], name
  # Concurrent requests were batched, and the service is still healthy.
  assert max(srv.batcher.batch_sizes) > 1, srv.batcher.batch_sizes
  assert sum(n * c for n, c in srv.batcher.batch_sizes.items()) == 400
  assert _request(srv.url, 'GET', '/healthz') == (200, {'status': 'ok'})
  print(f'{len(futures)} requests in {elapsed:.1f} s; batch sizes {dict(srv.batcher.batch_sizes)}')


def test_model_endpoint(server):
  srv, clf = server
  status, info = _request(srv.url, 'GET', '/v1/model')
  assert status == 200 and info['class_names'] == list(clf.class_names)
  assert info['input_shape'] == [8, 8, 1] and info['checkpoint_step'] == clf.step


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
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
