"""--mode=serve, the service's limits: 503 on a full queue (a request's images queued all or
none), 413 for more images than the queue holds, 499 for a client gone mid-upload, the server's
memory over 5,000 requests, and config.serve values out of range refused."""
import base64
import concurrent.futures
import http.client
import json
import logging
import os
import re
import socket
import threading
import time

import numpy as np
import pytest

from imgcls_jax import inference, serve
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests import test_serve
from tests.test_predict import trained_run
from tests.test_serve import _form, _png, _request, _serve_cfg, _split, _v2_body

server = test_serve.server  # the module-scoped fixture: this file starts its own server


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
