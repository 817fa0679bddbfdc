"""--mode=serve, what integrators rely on beyond the answers: KServe v2's ``outputs`` selection and
input name, CORS for web apps of other origins, and uploads decoded on ``decode_threads``
threads only (memory bounded under many large uploads)."""
import concurrent.futures
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, serve
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests.test_predict import trained_run
from tests.test_serve import _request, _serve_cfg, _v2_body

V2 = '/v2/models/imgcls/infer'


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  config, workdir, _ = trained_run(tmp_path_factory, tfds_dir)
  return config, inference.classifier(inference.load(workdir, config))


@pytest.fixture
def served(trained):
  """A server of the trained run, started with the given config.serve changes."""
  config, clf = trained
  servers = []

  def start(**changes):
    servers.append(serve.make_server(clf, _serve_cfg(config, **changes), warm_up=False).start())
    return servers[-1]
  yield start
  for srv in servers:
    srv.close()


def test_v2_returns_the_outputs_a_request_names_in_its_order(served):
  """KServe v2 clients that name ``outputs`` read ``outputs[0]`` as the first they asked for; the
  service used to send both, probabilities first, whatever was asked. Now it sends those asked
  for, in that order, and an output or input name the model does not have is a 400 naming the
  right ones (it was accepted)."""
  srv = served()
  x, _ = digits.load_arrays('test')
  both = json.loads(_v2_body(x[:3]))
  status, full = _request(srv.url, 'POST', V2, json.dumps(both))
  assert status == 200 and [o['name'] for o in full['outputs']] == ['probabilities', 'logits']
  by_name = {o['name']: o for o in full['outputs']}
  for asked in (['logits'], ['logits', 'probabilities'], ['probabilities']):
    status, out = _request(srv.url, 'POST', V2, json.dumps(
        {**both, 'outputs': [{'name': n} for n in asked]}))
    assert status == 200 and [o['name'] for o in out['outputs']] == asked, out
    for o in out['outputs']:
      assert o['shape'] == [3, 10]
      np.testing.assert_allclose(o['data'], by_name[o['name']]['data'], rtol=1e-6, atol=1e-7)
  for body, words in [({**both, 'outputs': [{'name': 'scores'}]},
                       "No output named 'scores'; this model's outputs are probabilities, logits"),
                      ({**both, 'outputs': 'logits'}, 'must be a list of {"name": ...} objects'),
                      ({**both, 'outputs': []}, 'must be a list of {"name": ...} objects'),
                      ({'inputs': [{**both['inputs'][0], 'name': 'wrong'}]},
                       "No input named 'wrong'; this model's one input is 'images'")]:
    status, payload = _request(srv.url, 'POST', V2, json.dumps(body))
    assert status == 400 and words in payload['error'], (body.get('outputs'), payload)


def _preflight(srv, origin):
  import http.client
  host, port = srv.url.split('//')[1].rsplit(':', 1)
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  try:
    conn.request('OPTIONS', '/v1/classify', headers={
        'Origin': origin, 'Access-Control-Request-Method': 'POST',
        'Access-Control-Request-Headers': 'content-type'})
    resp = conn.getresponse()
    resp.read()
    return resp.status, resp.getheader('Access-Control-Allow-Origin')
  finally:
    conn.close()


def test_cors_origins_answer_a_browsers_preflight_for_the_listed_origins_only(served, trained):
  x, _ = digits.load_arrays('test')
  closed = served()   # the default: no other origin may call it
  assert _preflight(closed, 'https://app.example.com') == (405, None)
  srv = served(cors_origins='https://app.example.com, http://localhost:3000')
  assert _preflight(srv, 'https://app.example.com') == (200, 'https://app.example.com')
  assert _preflight(srv, 'http://localhost:3000') == (200, 'http://localhost:3000')
  status, allowed = _preflight(srv, 'https://evil.example.com')
  assert status == 400 and allowed is None
  import http.client
  host, port = srv.url.split('//')[1].rsplit(':', 1)
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.request('POST', V2, body=_v2_body(x[:1]), headers={'Origin': 'https://app.example.com'})
  resp = conn.getresponse()
  resp.read()
  conn.close()
  assert resp.status == 200
  assert resp.getheader('Access-Control-Allow-Origin') == 'https://app.example.com'
  assert 'X-Request-ID' in (resp.getheader('Access-Control-Expose-Headers') or '')
  assert _preflight(served(cors_origins='*'), 'https://any.example')[1] == '*'
  config, clf = trained
  for bad in ('app.example.com', 'https://app.example.com/page'):
    with pytest.raises(UserError, match=rf"^config\.serve\.cors_origins: '{bad}' is not an "
                       r'origin \(scheme://host\[:port\], no path'):
      serve.make_server(clf, _serve_cfg(config, cors_origins=bad), warm_up=False)


def test_uploads_are_decoded_on_decode_threads_only(served, trained):
  """Every upload was decoded on Starlette's pool of 40 threads: 16 concurrent uploads decoded at
  once, and each thread kept its decode memory (a 36 Mpx PNG among them took the service from
  0.4 to 2.4 GB). Now at most ``decode_threads`` decode at a time, on their own threads, and
  the answers are unchanged."""
  config, clf = trained
  x, _ = digits.load_arrays('test')
  real, lock = clf.prepare, threading.Lock()
  active, seen = [0, 0], set()

  def slow_prepare(data, **kwargs):
    with lock:
      active[0] += 1
      active[1] = max(active[1], active[0])
      seen.add(threading.current_thread().name)
    time.sleep(0.05)
    try:
      return real(data, **kwargs)
    finally:
      with lock:
        active[0] -= 1
  srv = served(decode_threads=2)
  clf.prepare = slow_prepare
  try:
    def png(i):
      buf = io.BytesIO()
      Image.fromarray(x[i, :, :, 0]).save(buf, 'PNG')
      return buf.getvalue()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
      got = list(pool.map(lambda i: _request(srv.url, 'POST', '/v1/classify?top_k=1', png(i)),
                          range(16)))
  finally:
    del clf.prepare
  assert all(status == 200 for status, _ in got)
  assert active[1] == 2, active   # (16 at once before)
  assert seen and all(name.startswith('decode') for name in seen), seen
  ref = clf.predict_arrays(x[:16])['probabilities'].argmax(-1)
  assert [p['predictions'][0]['index'] for _, p in got] == ref.tolist()
  with pytest.raises(UserError, match=r'config\.serve\.decode_threads must be >= 0 \(0 = one per '
                     r'CPU core, at most 8\), got -1'):
    served(decode_threads=-1)


def test_uploads_waiting_for_a_decode_count_toward_max_queue(served, trained):
  """Uploads waiting for a decode thread were unbounded (each holding its body) while the model's
  queue stayed empty: past max_queue of them now get the full queue's 503, and a preflight to
  any path no longer adds a metrics label per path."""
  config, clf = trained
  x, _ = digits.load_arrays('test')
  release, entered = threading.Event(), threading.Event()
  real = clf.prepare

  def held(data, **kwargs):
    entered.set()
    release.wait(60)
    return real(data, **kwargs)
  srv = served(decode_threads=1, max_queue=2, cors_origins='*')
  clf.prepare = held
  buf = io.BytesIO()
  Image.fromarray(x[0, :, :, 0]).save(buf, 'PNG')
  try:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(_request, srv.url, 'POST', '/v1/classify', buf.getvalue())
      assert entered.wait(30)
      second = pool.submit(_request, srv.url, 'POST', '/v1/classify', buf.getvalue())
      deadline = time.monotonic() + 30
      while srv.service.decoding < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      assert srv.service.decoding == 2   # one decoding, one waiting for the thread
      assert _request(srv.url, 'POST', '/v1/classify', buf.getvalue()) == (
          503, {'error': 'The service is overloaded; retry shortly.'})
      release.set()
      assert first.result(60)[0] == 200 and second.result(60)[0] == 200
  finally:
    release.set()
    del clf.prepare
  assert srv.service.decoding == 0
  import http.client
  host, port = srv.url.split('//')[1].rsplit(':', 1)
  for i in range(3):
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request('OPTIONS', f'/random/{i}', headers={'Origin': 'https://a.example',
                                                     'Access-Control-Request-Method': 'POST'})
    assert conn.getresponse().status == 200
    conn.close()
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  conn.request('GET', '/metrics')
  text = conn.getresponse().read().decode()
  conn.close()
  assert '/random/' not in text and 'endpoint="unmatched",code="200"' in text
