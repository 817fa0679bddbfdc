"""``--mode=serve``: a small HTTP classification service that batches concurrent requests.

  python -m imgcls_jax.main --mode=serve --workdir=RUN \
      [--config.serve.port=8080] [--config.serve.host=127.0.0.1]
  curl --data-binary @photo.jpg 'http://127.0.0.1:8080/v1/classify?top_k=3'

Endpoints:
  POST /v1/classify[?top_k=N]   body: the raw bytes of one image (any format PIL reads, any size
                                or mode) -> 200 {"predictions": [{"class", "index", "probability"},
                                ...], "checkpoint_step": S}
  GET  /v1/model                class names, input shape, checkpoint step
  GET  /healthz                 {"status": "ok"}
Bad requests get a 4xx with {"error": "<one sentence>"}: 400 (empty body, bad top_k, short body),
404 (unknown path), 405 (method), 411 (no Content-Length), 413 (body or decoded image too large),
415 (not a decodable image, or a multipart form); 503 when the queue is full. The service never
exits on a bad request; an unexpected failure of one request is a 500 for that request only.

Each request is decoded and preprocessed on its own thread (as ``--mode=predict`` does), then
queued; one worker thread takes up to ``max_batch_size`` queued images (waiting at most
``batch_timeout_ms`` for a batch to fill) and runs them through the model in one call. Loopback
only by default: there is no authentication.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.server
import json
import logging
import queue
import signal
import threading
import time
import urllib.parse
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import inference
from imgcls_jax.data.images import ImageTooLarge, UnreadableImage
from imgcls_jax.errors import UserError

_LOOPBACK = ('127.0.0.1', 'localhost', '::1')


class Overloaded(Exception):
  """The request queue is full."""


@dataclasses.dataclass
class _Item:
  image: np.ndarray
  future: concurrent.futures.Future


class Batcher:
  """Gathers images submitted from many threads into batches for one model-running thread."""

  def __init__(self, clf: inference.Classifier, *, max_batch_size: int, timeout_s: float, max_queue: int):
    self.clf = clf
    self.max_batch_size = max_batch_size
    self.timeout_s = timeout_s
    self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> batches run
    self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=max_queue)
    self._thread = threading.Thread(target=self._loop, name='batcher', daemon=True)
    self._thread.start()

  def submit(self, image: np.ndarray) -> concurrent.futures.Future:
    """A future of the image's class probabilities; raises Overloaded when the queue is full."""
    item = _Item(image, concurrent.futures.Future())
    try:
      self._queue.put_nowait(item)
    except queue.Full:
      raise Overloaded() from None
    return item.future

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join(timeout=30)

  def _loop(self) -> None:
    while True:
      first = self._queue.get()
      if first is None:
        return
      items, stop = [first], False
      deadline = time.monotonic() + self.timeout_s
      while len(items) < self.max_batch_size:
        try:
          item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if item is None:
          stop = True
          break
        items.append(item)
      self._run(items)
      if stop:
        return

  def _run(self, items: list[_Item]) -> None:
    try:
      probs = self.clf.predict_arrays(np.stack([it.image for it in items]))['probabilities']
    except Exception as e:  # one failed batch fails its requests, never the service
      logging.exception('Model call failed for a batch of %d.', len(items))
      for it in items:
        it.future.set_exception(e)
      return
    self.batch_sizes[len(items)] += 1
    for it, p in zip(items, probs):
      it.future.set_result(p)


class _HttpError(Exception):
  def __init__(self, status: int, message: str, close: bool = False):
    super().__init__(message)
    self.status, self.message, self.close = status, message, close


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  timeout = 30                      # seconds a client may stall mid-request
  server: 'Server'

  def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class signature)
    logging.debug('%s %s', self.address_string(), format % args)

  def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
    logging.info('%s %s', self.address_string(), format % args)

  def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
    """http.server's own refusals (bad request line, huge headers, unknown method), as JSON."""
    if code == 501:  # a method http.server has no handler for: a client error here
      code = 405
      message = f'{self.command} is not supported; use POST /v1/classify or GET /v1/model'
    if self.request_version == 'HTTP/0.9':  # unparseable request line: still send a status line
      self.request_version = 'HTTP/1.0'
    self.log_error('code %d, message %s', code, message)
    text = message or self.responses.get(code, ('Error',))[0]
    self._send(code, {'error': f'{text}.'}, close=True)

  def _send(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    if status == 503:
      self.send_header('Retry-After', '1')
    if close:
      self.send_header('Connection', 'close')
      self.close_connection = True
    self.end_headers()
    self.wfile.write(body)

  def _guard(self, fn) -> None:
    try:
      status, payload = fn()
      self._send(status, payload)
    except _HttpError as e:
      self._send(e.status, {'error': e.message}, close=e.close)
    except Exception:  # never let one request take the service down
      logging.exception('Unexpected error serving %s %s', self.command, self.path)
      self._send(500, {'error': 'Internal error while classifying; see the server log.'},
                 close=True)

  def do_GET(self) -> None:  # noqa: N802 (http.server naming)
    self._guard(self._get)

  def do_POST(self) -> None:  # noqa: N802
    self._guard(self._post)

  def _not_allowed(self) -> None:
    def fail():
      raise _HttpError(405, f'{self.command} is not supported; use POST /v1/classify or GET '
                       '/v1/model.', close=True)
    self._guard(fail)

  do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

  def _get(self) -> tuple[int, dict[str, Any]]:
    path = urllib.parse.urlsplit(self.path).path
    clf = self.server.batcher.clf
    if path == '/healthz':
      return 200, {'status': 'ok'}
    if path == '/v1/model':
      return 200, {'class_names': list(clf.class_names), 'input_shape': list(clf.image_shape),
                   'checkpoint_step': clf.step, 'max_upload_bytes': self.server.max_upload_bytes}
    if path == '/v1/classify':
      raise _HttpError(405, 'Use POST /v1/classify with the image bytes as the body.')
    raise _HttpError(404, f'No such endpoint {path}; use POST /v1/classify or GET /v1/model.')

  def _read_body(self) -> bytes:
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      raise _HttpError(411, 'Chunked uploads are not accepted; send a Content-Length.', True)
    length = self.headers.get('Content-Length')
    if length is None:
      raise _HttpError(411, 'Missing Content-Length header; send the image bytes as the body.',
                       True)
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      raise _HttpError(400, f'Bad Content-Length {length!r}.', True) from None
    if n > self.server.max_upload_bytes:
      self._discard(n)
      raise _HttpError(413, f'Upload of {n} bytes is larger than the limit of '
                       f'{self.server.max_upload_bytes} bytes.', True)
    body = self.rfile.read(n)
    if len(body) != n:
      raise _HttpError(400, f'The body ended after {len(body)} of {n} bytes.', True)
    return body

  def _post(self) -> tuple[int, dict[str, Any]]:
    url = urllib.parse.urlsplit(self.path)
    if url.path != '/v1/classify':
      body_ok = self._drain()
      raise _HttpError(404, f'No such endpoint {url.path}; POST images to /v1/classify.',
                       not body_ok)
    body = self._read_body()
    clf = self.server.batcher.clf
    query = urllib.parse.parse_qs(url.query)
    k = self.server.top_k
    if 'top_k' in query:
      try:
        k = int(query['top_k'][0])
      except ValueError:
        k = 0
      if not 1 <= k <= len(clf.class_names):
        raise _HttpError(400, f'top_k must be an integer from 1 to {len(clf.class_names)}.')
    if not body:
      raise _HttpError(400, 'Empty body; send the bytes of one image.')
    if self.headers.get('Content-Type', '').lower().startswith('multipart/'):
      raise _HttpError(415, 'Multipart forms are not accepted; send the raw image bytes as the '
                       'body (e.g. curl --data-binary @photo.jpg).')
    try:
      image = clf.prepare(body, max_pixels=self.server.max_pixels)
    except ImageTooLarge as e:
      raise _HttpError(413, f'The body is {e}; send a smaller image.') from None
    except UnreadableImage as e:
      raise _HttpError(415, f'The body is {e}; send one image (JPEG, PNG, ...).') from None
    try:
      probs = self.server.batcher.submit(image).result(timeout=120)
    except Overloaded:
      raise _HttpError(503, 'The service is overloaded; retry shortly.') from None
    return 200, {'predictions': inference.top_k(probs, clf.class_names, k), 'checkpoint_step': clf.step}

  def _discard(self, n: int) -> None:
    """Reads and drops a refused body (up to 8x the limit), so the client sees our answer instead
    of a connection reset."""
    if n > 8 * self.server.max_upload_bytes:
      return
    while n > 0:
      chunk = self.rfile.read(min(n, 1 << 16))
      if not chunk:
        return
      n -= len(chunk)

  def _drain(self) -> bool:
    """Reads and drops a small body so the connection can be reused; False if it cannot."""
    try:
      n = int(self.headers.get('Content-Length', '0'))
    except ValueError:
      return False
    if 0 <= n <= self.server.max_upload_bytes:
      self.rfile.read(n)
      return True
    return False


class Server(http.server.ThreadingHTTPServer):
  """The HTTP server; ``start()`` serves on a background thread, ``close()`` stops everything."""
  daemon_threads = True
  request_queue_size = 128

  def __init__(self, clf: inference.Classifier, cfg: ml_collections.ConfigDict):
    self.batcher = Batcher(clf, max_batch_size=cfg.max_batch_size,
                           timeout_s=cfg.batch_timeout_ms / 1000.0, max_queue=cfg.max_queue)
    self.max_upload_bytes = int(cfg.max_upload_bytes)
    self.max_pixels = int(cfg.max_pixels)
    self.top_k = int(cfg.top_k)
    try:
      super().__init__((cfg.host, int(cfg.port)), _Handler)
    except OSError as e:
      self.batcher.close()
      raise UserError(f'Cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); choose another '
                      'config.serve.port (0 = any free port) or config.serve.host.') from None
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'http://{host}:{port}'

  def start(self) -> 'Server':
    self._thread = threading.Thread(target=self.serve_forever, name='http', daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    self.shutdown()
    self.server_close()
    self.batcher.close()


def _validate(cfg: ml_collections.ConfigDict) -> None:
  for key in ('max_batch_size', 'max_upload_bytes', 'max_queue', 'top_k'):
    if cfg[key] < 1:
      raise UserError(f'config.serve.{key} must be positive, got {cfg[key]}.')
  if cfg.batch_timeout_ms < 0 or cfg.port < 0:
    raise UserError('config.serve.batch_timeout_ms and config.serve.port must be >= 0.')


def make_server(clf: inference.Classifier, cfg: ml_collections.ConfigDict, *, warm_up: bool = True) -> Server:
  """A server for ``clf`` (not yet serving); ``warm_up`` compiles every batch size first."""
  _validate(cfg)
  clf.max_batch = cfg.max_batch_size
  if warm_up:
    size = 1
    while True:  # the power-of-two batch shapes predict_arrays pads to
      clf.predict_arrays(np.zeros((min(size, cfg.max_batch_size),) + clf.image_shape, np.uint8))
      if size >= cfg.max_batch_size:
        break
      size *= 2
  return Server(clf, cfg)


def serve(config: ml_collections.ConfigDict | None, workdir: str,
          overrides: dict[str, Any] | None = None) -> None:
  """The ``serve`` mode: serves until SIGINT / SIGTERM."""
  step = int(overrides.get('serve.step', -1)) if overrides is not None else config.serve.step
  trained = inference.load(workdir, config, step=step, overrides=overrides)
  cfg = trained.run.serve
  _validate(cfg)
  clf = inference.classifier(trained, max_batch=cfg.max_batch_size)
  server = make_server(clf, cfg)
  if cfg.host not in _LOOPBACK:
    logging.warning('Serving on %s: reachable from the network, with no authentication.', cfg.host)
  stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
  signal.signal(signal.SIGTERM, stop)
  print(f'Serving checkpoint {clf.step} ({len(clf.class_names)} classes) on {server.url} '
        f'- POST images to {server.url}/v1/classify; Ctrl-C stops.', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    server.batcher.close()
    logging.info('Stopped. Batches run, by size: %s',
                 dict(sorted(server.batcher.batch_sizes.items())))
