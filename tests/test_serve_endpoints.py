"""--mode=serve, the endpoints besides /v1/classify: TF-Serving's REST API, KServe v2's (and its
malformed tensors), /v1/model with the offline web page, and HEAD answered as GET."""
import base64
import http.client
import json
import re

import numpy as np

from imgcls_jax.data import digits
from tests import test_serve
from tests.test_serve import _png, _request, _split

server = test_serve.server  # the module-scoped fixture: this file starts its own server


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
