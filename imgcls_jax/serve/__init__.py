"""``--mode=serve``: an HTTP classification service (FastAPI under uvicorn) with a web page.

  python -m imgcls_jax.main --mode=serve --workdir=RUN \
      [--config.serve.port=8080] [--config.serve.host=127.0.0.1]
  open http://127.0.0.1:8080/                      # the page: choose or drop photos
  curl --data-binary @photo.jpg 'http://127.0.0.1:8080/v1/classify?top_k=3'
  curl -F image=@photo.jpg http://127.0.0.1:8080/v1/classify

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):
  GET  /                              the web page (plain HTML/JS, works offline)
  POST /v1/classify[?top_k=N]         one image: raw bytes as the body, or a multipart form of one
                                      file (of several, the field ``image``) -> {"predictions":
                                      [{"class", "index", "probability"}, ...], "checkpoint_step":
                                      S}; N (default config.serve.top_k) above the class count
                                      lists every class
  GET  /v1/model, GET /healthz        class names, input shape, step; liveness
  GET  /v1/models/<name>[/metadata]   TF-Serving: status, signature
  POST /v1/models/<name>[/versions/<step>]:predict
                                      TF-Serving: {"instances": [{"b64": "..."} or HxWxC uint8
                                      pixels, ...]} -> {"predictions": [{"probabilities",
                                      "logits"}]}
  GET  /v2/health/live, /v2/health/ready, /v2/models/<name>[/ready]   KServe v2
  POST /v2/models/<name>/infer        KServe v2: a UINT8 [N, H, W, C] tensor ``images``
  GET  /metrics                       Prometheus: requests, latency histogram, batch sizes
Bad requests get a 4xx with {"error": "<one sentence>"}: 400 (empty or malformed body, bad
top_k, a repeated top_k or a query parameter that looks meant for it), 404 (unknown path or model
name), 405 (method), 411 (no Content-Length, chunked), 413 (body or decoded image too large, more
images in one request than ``max_queue``), 415 (not a decodable image); 503 when the queue is
full. The service never exits on a bad request; an unexpected failure of one request is a 500 for
it only.
A client that closes the connection before sending its whole body is one log line and counted as
499 (nginx's code for it). Uvicorn has no timeout on reading a body: one shorter than its
Content-Length holds its connection until the client closes it (a reverse proxy's body timeout
bounds that).
Every response carries ``X-Request-ID`` (the client's, or a new one), also in the log lines.

Images are decoded and preprocessed on ``decode_threads`` threads (as ``--mode=predict`` does:
each holds up to ``max_pixels`` x 4 bytes while it decodes), then queued;
one model thread takes up to ``max_batch_size`` queued images (waiting at most
``batch_timeout_ms`` for a batch to fill) and runs them in one call. Loopback only by default:
there is no authentication. ``cors_origins`` lets web pages of other origins call the API
(CORS, preflight answered); none may by default.
"""
from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from typing import Any

import ml_collections
import numpy as np
import uvicorn

from imgcls_jax import inference
from imgcls_jax.errors import UserError
from imgcls_jax.serve.app import RequestLog, Service, cors_origins, create_app
from imgcls_jax.serve.batcher import Batcher, Overloaded
from imgcls_jax.serve.metrics import Metrics

__all__ = ['Batcher', 'Overloaded', 'Server', 'make_server', 'serve']
_LOOPBACK = ('127.0.0.1', 'localhost', '::1')


class Server:
  """The service bound to its port; ``start()`` serves on a background thread, ``close()`` stops
  everything, ``serve_forever()`` serves on this thread until SIGINT / SIGTERM."""

  def __init__(self, clf: inference.Classifier, cfg: ml_collections.ConfigDict):
    self.batcher = Batcher(clf, max_batch_size=int(cfg.max_batch_size),
                           timeout_s=cfg.batch_timeout_ms / 1000.0, max_queue=int(cfg.max_queue))
    self.metrics = Metrics()
    self.service = Service(self.batcher, cfg, self.metrics,
                           model_name=cfg.get('model_name', '') or 'imgcls')
    self.app = create_app(self.service)
    try:
      self.socket = _bind(cfg.host, int(cfg.port))
    except OSError as e:
      self.batcher.close()
      self.service.decoder.shutdown(wait=False)
      raise UserError(f'Cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); choose another '
                      'config.serve.port (0 = any free port) or config.serve.host.') from None
    self._uvicorn = uvicorn.Server(uvicorn.Config(
        RequestLog(self.app, self.metrics), log_config=None, access_log=False, lifespan='off',
        timeout_keep_alive=int(cfg.get('keep_alive_s', 5)), backlog=128))
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    host, port = self.socket.getsockname()[:2]
    return f'http://[{host}]:{port}' if ':' in host else f'http://{host}:{port}'

  def start(self) -> 'Server':
    """Serves on a background thread (returns once it accepts connections)."""
    self._thread = threading.Thread(target=self._uvicorn.run, kwargs={'sockets': [self.socket]},
                                    name='http', daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
      time.sleep(0.01)
    if not self._uvicorn.started:
      raise RuntimeError('The HTTP server did not start.')
    return self

  def serve_forever(self) -> None:
    """Serves on this thread until SIGINT or SIGTERM, then finishes the requests in flight."""
    self._uvicorn.run(sockets=[self.socket])

  def stop(self) -> None:
    """Asks the server to finish the requests in flight and return (from any thread)."""
    self.service.ready = False
    self._uvicorn.should_exit = True

  def close(self) -> None:
    """Stops serving, then stops the batcher."""
    self.stop()
    if self._thread is not None:
      self._thread.join(timeout=30)
    self.socket.close()
    self.service.decoder.shutdown(wait=True)
    self.batcher.close()


def _bind(host: str, port: int) -> socket.socket:
  family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
    sock.listen(128)  # connections wait in the backlog until the server loop accepts them
  except OSError:
    sock.close()
    raise
  sock.set_inheritable(True)
  return sock


def _validate(cfg: ml_collections.ConfigDict) -> None:
  for key in ('max_batch_size', 'max_upload_bytes', 'max_queue', 'top_k'):
    if cfg[key] < 1:
      raise UserError(f'config.serve.{key} must be positive, got {cfg[key]}.')
  if cfg.get('decode_threads', 0) < 0:
    raise UserError(f'config.serve.decode_threads must be >= 0 (0 = one per CPU core, at most 8), '
                    f'got {cfg.decode_threads}.')
  if cfg.get('max_pixels', 0) < 0:
    raise UserError(f'config.serve.max_pixels must be >= 0 (0 = no limit), got {cfg.max_pixels}.')
  if cfg.batch_timeout_ms < 0:
    raise UserError(f'config.serve.batch_timeout_ms must be >= 0, got {cfg.batch_timeout_ms}.')
  if not 0 <= cfg.port <= 65535:
    raise UserError(f'config.serve.port must be from 0 to 65535 (0 = any free port), got '
                    f'{cfg.port}.')
  if cfg.get('keep_alive_s', 5) < 0:
    raise UserError(f'config.serve.keep_alive_s must be >= 0 (idle seconds a kept-alive '
                    f'connection stays open), got {cfg.keep_alive_s}.')
  try:
    cors_origins(cfg.get('cors_origins', ''))
  except ValueError as e:
    raise UserError(f'config.serve.cors_origins: {e}; separate several with commas.') from None
  name = cfg.get('model_name', '') or 'imgcls'
  if not re.fullmatch(r'[A-Za-z0-9._-]+', name):
    raise UserError(f"config.serve.model_name='{name}' must be one URL path segment of letters, "
                    "digits, '.', '_' or '-' (it names the model in /v1/models/<name> and "
                    '/v2/models/<name>).')


def make_server(clf: inference.Classifier, cfg: ml_collections.ConfigDict, *,
                warm_up: bool = True) -> Server:
  """A server for ``clf`` (bound, not yet serving); ``warm_up`` compiles every batch size first."""
  _validate(cfg)
  if cfg.top_k > len(clf.class_names):
    logging.info('config.serve.top_k=%d is more than the model has classes: answers list all %d.',
                 cfg.top_k, len(clf.class_names))
  clf.max_batch = int(cfg.max_batch_size)
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
  trained = inference.load(workdir, config, step=step, overrides=overrides,
                           step_key='serve.step')
  cfg = trained.run.serve
  _validate(cfg)
  clf = inference.classifier(trained, max_batch=cfg.max_batch_size)
  server = make_server(clf, cfg)
  if cfg.host not in _LOOPBACK:
    logging.warning('Serving on %s: reachable from the network, with no authentication.', cfg.host)
  # While serving, uvicorn handles SIGINT / SIGTERM (graceful stop) and then re-raises them with
  # the handlers found: this one also stops a server that has not started its loop yet.
  signal.signal(signal.SIGTERM, lambda *_: server.stop())
  print(f'Serving checkpoint {clf.step} ({len(clf.class_names)} classes) on {server.url} '
        f'- open {server.url}/ or POST images to {server.url}/v1/classify; Ctrl-C stops.',
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.socket.close()
    server.service.decoder.shutdown(wait=False)
    server.batcher.close()
    logging.info('Stopped. Batches run, by size: %s',
                 dict(sorted(server.batcher.batch_sizes.items())))
