"""The ASGI application (FastAPI on Starlette): the endpoints, their limits and one-line errors."""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib.resources
import logging
import os
import re
import time
import uuid
from typing import Any, Awaitable, Callable

import fastapi
import ml_collections
import numpy as np
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from imgcls_jax import answers, inference
from imgcls_jax.data.images import ImageTooLarge, UnreadableImage
from imgcls_jax.serve import bodies
from imgcls_jax.serve.batcher import Batcher, Overloaded
from imgcls_jax.serve.bodies import ApiError
from imgcls_jax.serve.metrics import Metrics

log = logging.getLogger('imgcls_jax.serve')
CLIENT_CLOSED = 499   # nginx's code for a client that closed the connection before the answer
_CLASSIFY_PARAMS = ('top_k',)   # the query parameters /v1/classify takes
V2_OUTPUTS = ('probabilities', 'logits')   # KServe v2's output tensors, in this order by default
_IMAGE_BODY = {'requestBody': {'required': True, 'content': {
    'image/*': {'schema': {'type': 'string', 'format': 'binary'}},
    'multipart/form-data': {'schema': {'type': 'object', 'properties': {
        'image': {'type': 'string', 'format': 'binary'}}}}}}}


@dataclasses.dataclass
class Service:
  """What the endpoints share."""
  batcher: Batcher
  cfg: ml_collections.ConfigDict      # config.serve
  metrics: Metrics
  model_name: str
  # Decodes run on these threads only (config.serve.decode_threads), not Starlette's pool of 40:
  # a large image's decode holds ~width x height x 4 bytes, and glibc keeps such memory per
  # thread (a 36 Mpx PNG among concurrent uploads took the process from 0.4 to 2.4 GB).
  decoder: concurrent.futures.ThreadPoolExecutor = dataclasses.field(init=False)
  decoding: int = 0   # uploads handed to ``decoder`` and not yet decoded (the event loop's count)
  ready: bool = True

  def __post_init__(self) -> None:
    self.decoder = concurrent.futures.ThreadPoolExecutor(decode_threads(self.cfg), 'decode')

  @property
  def clf(self) -> inference.Classifier:
    return self.batcher.clf

  @property
  def top_k(self) -> int:
    """config.serve.top_k, at most the class count (as predict clamps config.predict.top_k)."""
    return min(int(self.cfg.top_k), len(self.clf.class_names))


def decode_threads(cfg: ml_collections.ConfigDict) -> int:
  """config.serve.decode_threads, 0 meaning one per CPU this process may use, at most 8 (each
  decode holds up to max_pixels x 4 bytes)."""
  return int(cfg.get('decode_threads', 0)) or min(len(os.sched_getaffinity(0)), 8)


def cors_origins(value: str) -> list[str]:
  """config.serve.cors_origins as a list: '' none, '*' any, else comma-separated origins, each
  scheme://host[:port] (ValueError naming the first that is not)."""
  origins = [o.strip() for o in str(value or '').split(',') if o.strip()]
  for o in origins:
    if o != '*' and (not re.fullmatch(r'https?://[^/\s]+', o)):
      raise ValueError(f"'{o}' is not an origin (scheme://host[:port], no path, e.g. "
                       "'https://app.example.com'), or '*' for any")
  return origins


def _error(status: int, message: str) -> JSONResponse:
  headers = {'Retry-After': '1'} if status == 503 else None
  return JSONResponse({'error': message}, status_code=status, headers=headers)


def guarded(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
  """Turns ApiError into its 4xx/503, a client gone before its whole body came into a 499 (the
  answer goes nowhere; RequestLog counts and logs it), and any other failure into a 500 for this
  request only."""
  @functools.wraps(fn)
  async def wrapper(request: Request, *args: Any, **kwargs: Any) -> Any:
    try:
      return await fn(request, *args, **kwargs)
    except ApiError as e:
      return _error(e.status, e.message)
    except ClientDisconnect:
      return _error(CLIENT_CLOSED, 'The client closed the connection before sending its whole '
                    'body.')
    except Exception:  # never let one request take the service down
      log.exception('[%s] Unexpected error serving %s %s', request.scope.get('request_id'),
                    request.method, request.url.path)
      return _error(500, 'Internal error while classifying; see the server log.')
  return wrapper


_TOP_K_TRIES = frozenset({'topk', 'top', 'topn', 'k', 'limit', 'maxresults', 'numresults'})


def _meant_top_k(name: str) -> bool:
  """A query parameter that reads as a try at top_k (topk, top-k, TopK, k, limit, ...): refused,
  so the answer does not silently ignore it; any other (a cache-buster, a token, a proxy's
  tracking parameter) is left alone."""
  return name.lower().replace('_', '').replace('-', '') in _TOP_K_TRIES


def _top_k(request: Request, svc: Service) -> int:
  """The classes to answer with: ?top_k=N (N >= 1; above the class count, all of them), else
  config.serve.top_k; 400 for a repeated top_k or a parameter that looks meant for it."""
  params = request.query_params
  for name in params.keys():
    if name not in _CLASSIFY_PARAMS and _meant_top_k(name):
      raise ApiError(400, f"Unknown query parameter '{name[:40]}'; /v1/classify takes only "
                     f"{', '.join(_CLASSIFY_PARAMS)}.")
    if name in _CLASSIFY_PARAMS and len(params.getlist(name)) > 1:
      raise ApiError(400, f'The query parameter {name} is given {len(params.getlist(name))} '
                     'times; give it once.')
  value = params.get('top_k')
  if value is None:
    return svc.top_k
  n = len(svc.clf.class_names)
  try:
    k = int(value)
  except ValueError:
    k = 0
  if k < 1:
    raise ApiError(400, f"top_k must be an integer of at least 1 (any above {n} lists all {n} "
                   f"classes), got '{value[:20]}'.")
  return min(k, n)


async def _prepare(svc: Service, data: bytes, what: str = 'The body') -> np.ndarray:
  if not data:
    raise ApiError(400, f'{what} is empty; send the bytes of one image.')
  if svc.decoding >= int(svc.cfg.max_queue):   # uploads waiting for a decode thread count too
    raise ApiError(503, 'The service is overloaded; retry shortly.')
  try:
    decoded = asyncio.get_running_loop().run_in_executor(
        svc.decoder, functools.partial(svc.clf.prepare, data, max_pixels=int(svc.cfg.max_pixels)))
  except RuntimeError:   # the executor is shut down: the server is stopping
    raise ApiError(503, 'The service is shutting down; retry shortly.') from None
  svc.decoding += 1
  try:
    return await decoded
  except ImageTooLarge as e:
    raise ApiError(413, f'{what} is {e}; send a smaller image.') from None
  except UnreadableImage as e:
    raise ApiError(415, f'{what} is {e}; send one image (JPEG, PNG, ...).') from None
  finally:
    svc.decoding -= 1


async def _classify(svc: Service, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Model outputs for each image, through the batcher; 503 when its queue has no room for all
  of them (then none is queued, so a refused request costs the model nothing)."""
  try:
    futures = svc.batcher.submit_all(images)
  except Overloaded:
    raise ApiError(503, 'The service is overloaded; retry shortly.') from None
  return list(await asyncio.wait_for(
      asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout=120))


def _at_most_queue(svc: Service, n: int) -> None:
  """413 for more images than the queue holds: such a request could never be queued whole."""
  limit = int(svc.cfg.max_queue)
  if n > limit:
    raise ApiError(413, f'The request has {n} images, more than the {limit} this service queues '
                   f'at once; send at most {limit} images per request.')


def _model(svc: Service, name: str) -> None:
  if name != svc.model_name:
    raise ApiError(404, f"No model named '{name}'; this service serves '{svc.model_name}'.")


def create_app(svc: Service) -> fastapi.FastAPI:
  """The application serving ``svc``."""
  app = fastapi.FastAPI(title='imgcls_jax', version='1', summary=(
      'Image classification: raw or multipart uploads, TF-Serving and KServe v2 endpoints.'))
  app.state.service = svc
  origins = cors_origins(svc.cfg.get('cors_origins', ''))
  if origins:   # browser pages of these origins may call the API (preflight answered)
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=['GET', 'POST'],
                       allow_headers=['*'], expose_headers=['X-Request-ID'])
  page = (importlib.resources.files('imgcls_jax.serve') / 'static' / 'index.html').read_text()

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
      return _error(404, f'No such endpoint {request.url.path}; see /docs for the API.')
    if exc.status_code == 405:
      return _error(405, f'{request.method} is not supported on {request.url.path}; see /docs.')
    return _error(exc.status_code, f'{str(exc.detail).rstrip(".")}.')

  @app.get('/', response_class=HTMLResponse, include_in_schema=False)
  async def index() -> HTMLResponse:
    return HTMLResponse(page)

  @app.get('/healthz', summary='Liveness')
  async def healthz() -> dict[str, str]:
    return {'status': 'ok'}

  @app.get('/v1/model', summary='Class names, input shape, checkpoint step')
  async def model_info() -> dict[str, Any]:
    c = svc.clf
    multi = c.trained.info.multilabel
    return {'name': svc.model_name, 'class_names': list(c.class_names),
            'input_shape': list(c.image_shape), 'checkpoint_step': c.step,
            'max_upload_bytes': int(svc.cfg.max_upload_bytes), 'top_k': svc.top_k,
            'task': 'multilabel' if multi else 'single_label',
            'thresholds': list(c.trained.decision_thresholds) if multi else None,
            'temperature': c.trained.temperature,
            'min_confidence': None if multi else c.trained.min_confidence,
            'unknown_below': None if multi else c.trained.unknown_below}

  @app.post('/v1/classify', openapi_extra=_IMAGE_BODY,
            summary='Classify one image: the raw bytes as the body, or one multipart file')
  @guarded
  async def classify(request: Request) -> Any:
    k = _top_k(request, svc)
    multipart = request.headers.get('content-type', '').lower().startswith('multipart/')
    image = await _prepare(svc, await bodies.upload(request, int(svc.cfg.max_upload_bytes)),
                           'The uploaded file' if multipart else 'The body')
    (out,) = await _classify(svc, [image])
    answer = {'predictions': answers.top_k(out['probabilities'], svc.clf.class_names, k),
              'checkpoint_step': svc.clf.step}
    if svc.clf.trained.info.multilabel:  # the tags above the run's per-class thresholds
      answer['tags'] = answers.tags(out['probabilities'], svc.clf.class_names,
                                      svc.clf.trained.decision_thresholds)
    else:   # the run's gates: abstained below its confidence threshold, unknown below its gate
      answer.update(answers.answer_gates(svc.clf.trained, out['probabilities'], out['logits']))
    return answer

  # ---- TF-Serving REST API ----
  @app.get('/v1/models/{name}', summary='TF-Serving: model status')
  @guarded
  async def tfs_status(request: Request, name: str) -> Any:
    _model(svc, name)
    return {'model_version_status': [{'version': str(svc.clf.step), 'state': 'AVAILABLE',
                                      'status': {'error_code': 'OK', 'error_message': ''}}]}

  @app.get('/v1/models/{name}/metadata', summary='TF-Serving: signature')
  @guarded
  async def tfs_metadata(request: Request, name: str) -> Any:
    _model(svc, name)
    return {'model_spec': {'name': name, 'signature_name': '', 'version': str(svc.clf.step)},
            'metadata': {'signature_def': {'signature_def': {'serving_default': _signature(svc)}}}}

  @app.post('/v1/models/{name}:predict',
            summary='TF-Serving: predict (row format: b64 image files or uint8 pixels)',
            openapi_extra={'requestBody': {'required': True, 'content': {'application/json': {
                'example': {'instances': [{'b64': '<base64 of a JPEG/PNG file>'}]}}}}})
  @guarded
  async def tfs_predict(request: Request, name: str) -> Any:
    _model(svc, name)
    payload = bodies.json_body(await bodies.read_body(request, int(svc.cfg.max_upload_bytes)))
    blobs = bodies.instances(payload, svc.clf.image_shape)
    _at_most_queue(svc, len(blobs))
    images = [await _prepare(svc, b, f'Instance {i}') if isinstance(b, bytes) else b
              for i, b in enumerate(blobs)]
    outs = await _classify(svc, images)
    return {'predictions': [{k: o[k].tolist() for k in ('probabilities', 'logits')}
                            for o in outs]}

  @app.post('/v1/models/{name}/versions/{version}:predict',
            summary='TF-Serving: predict, naming the version (the checkpoint step served)')
  @guarded
  async def tfs_predict_version(request: Request, name: str, version: str) -> Any:
    if not (version.isdigit() and int(version) == svc.clf.step):
      _model(svc, name)
      raise ApiError(404, f"Model '{name}' has no version {version[:20]!r}; this service serves "
                     f'version {svc.clf.step} (the checkpoint step).')
    return await tfs_predict(request, name)

  # ---- KServe v2 (Open Inference Protocol) ----
  @app.get('/v2/health/live', summary='KServe v2: live')
  async def live() -> dict[str, bool]:
    return {'live': True}

  @app.get('/v2/health/ready', summary='KServe v2: ready')
  async def ready() -> Response:
    return JSONResponse({'ready': svc.ready}, status_code=200 if svc.ready else 503)

  @app.get('/v2/models/{name}', summary='KServe v2: model metadata')
  @guarded
  async def v2_metadata(request: Request, name: str) -> Any:
    _model(svc, name)
    h, w, c = svc.clf.image_shape
    k = len(svc.clf.class_names)
    return {'name': name, 'versions': [str(svc.clf.step)], 'platform': 'jax',
            'inputs': [{'name': 'images', 'datatype': 'UINT8', 'shape': [-1, h, w, c]}],
            'outputs': [{'name': o, 'datatype': 'FP32', 'shape': [-1, k]} for o in V2_OUTPUTS]}

  @app.get('/v2/models/{name}/ready', summary='KServe v2: model ready')
  @guarded
  async def v2_model_ready(request: Request, name: str) -> Any:
    _model(svc, name)
    return JSONResponse({'name': name, 'ready': svc.ready}, status_code=200 if svc.ready else 503)

  @app.post('/v2/models/{name}/infer', summary='KServe v2: infer (UINT8 images tensor)')
  @guarded
  async def v2_infer(request: Request, name: str) -> Any:
    _model(svc, name)
    payload = bodies.json_body(await bodies.read_body(request, int(svc.cfg.max_upload_bytes)))
    images = bodies.v2_images(payload, svc.clf.image_shape)
    wanted = bodies.v2_outputs(payload, V2_OUTPUTS)
    _at_most_queue(svc, len(images))
    outs = await _classify(svc, list(images))
    k = len(svc.clf.class_names)
    result = {'model_name': name, 'model_version': str(svc.clf.step),
              'outputs': [{'name': o, 'datatype': 'FP32', 'shape': [len(outs), k],
                           'data': np.stack([x[o] for x in outs]).ravel().tolist()}
                          for o in wanted]}
    if isinstance(payload.get('id'), str):
      result['id'] = payload['id']
    return result

  @app.get('/metrics', response_class=PlainTextResponse, summary='Prometheus metrics')
  async def metrics() -> PlainTextResponse:
    text = svc.metrics.render(svc.batcher.batch_sizes, svc.batcher.max_batch_size,
                              svc.batcher.queue_depth, svc.clf.step)
    return PlainTextResponse(text, media_type='text/plain; version=0.0.4')

  return app


def _signature(svc: Service) -> dict[str, Any]:
  h, w, c = svc.clf.image_shape
  k = len(svc.clf.class_names)
  dims = lambda *d: {'dim': [{'size': str(x)} for x in d]}  # noqa: E731
  return {'inputs': {'images': {'dtype': 'DT_UINT8', 'tensor_shape': dims(-1, h, w, c),
                                'name': 'images'}},
          'outputs': {o: {'dtype': 'DT_FLOAT', 'tensor_shape': dims(-1, k), 'name': o}
                      for o in ('probabilities', 'logits')},
          'method_name': 'tensorflow/serving/predict'}


class RequestLog:
  """ASGI middleware: a request ID (``X-Request-ID``, kept from the client or made here) on every
  response and log line, and each request's status and latency in the metrics. A HEAD request
  (uptime monitors, load balancers' health checks, ``curl -I``) is answered as its GET, with the
  same headers and no body (FastAPI's GET routes answered it 405)."""

  def __init__(self, app: Any, metrics: Metrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    given = dict(scope['headers']).get(b'x-request-id', b'').decode('latin-1')[:64]
    rid = given if given and given.isprintable() else uuid.uuid4().hex[:16]
    scope['request_id'] = rid
    start, status = time.perf_counter(), [500]
    head = scope['method'] == 'HEAD'
    inner = {**scope, 'method': 'GET'} if head else scope   # the server still sees the HEAD

    async def send_with_id(message: dict[str, Any]) -> None:
      if head and message['type'] == 'http.response.body':
        message = {**message, 'body': b''}
      if message['type'] == 'http.response.start':
        status[0] = message['status']
        message.setdefault('headers', [])
        message['headers'] = list(message['headers']) + [(b'x-request-id', rid.encode())]
        # A bounded label set: no route (a 404, or a CORS preflight answered before routing,
        # whatever its path) is 'unmatched'.
        endpoint = getattr(inner.get('route'), 'path', None) or 'unmatched'
        elapsed = time.perf_counter() - start
        self.metrics.observe(endpoint, status[0], elapsed)
        why = (' (the client closed the connection before sending its whole body)'
               if status[0] == CLIENT_CLOSED else '')
        log.info('[%s] %s %s -> %d in %.1f ms%s', rid, scope['method'], scope['path'], status[0],
                 1000 * elapsed, why)
      await send(message)

    await self.app(inner, receive, send_with_id)
