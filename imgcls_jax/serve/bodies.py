"""Request bodies read and decoded for the endpoints (serve/app.py), each refusal an ``ApiError``:
its HTTP status and one sentence naming the problem and the fix. Length limits before reading, a
raw or multipart image upload, JSON, TF-Serving's ``instances`` and KServe v2's ``UINT8`` tensor.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request


class ApiError(Exception):
  """A request the service refuses: HTTP ``status`` and a one-sentence ``message``."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


async def check_length(request: Request, limit: int) -> None:
  """Refuses chunked uploads, a missing Content-Length and more than ``limit`` bytes."""
  if 'chunked' in request.headers.get('transfer-encoding', '').lower():
    raise ApiError(411, 'Chunked uploads are not accepted; send a Content-Length.')
  length = request.headers.get('content-length')
  if length is None:
    raise ApiError(411, 'Missing Content-Length header; send the image bytes as the body.')
  n = int(length)  # the HTTP parser has already refused a malformed length
  if n > limit:
    if n <= 8 * limit:  # read and drop it, so the client sees this answer, not a reset
      async for _ in request.stream():
        pass
    raise ApiError(413, f'Upload of {n} bytes is larger than the limit of {limit} bytes.')


async def read_body(request: Request, limit: int) -> bytes:
  """The whole body, after ``check_length``."""
  await check_length(request, limit)
  return await request.body()


async def upload(request: Request, limit: int) -> bytes:
  """The image bytes of a raw-body or multipart upload of at most ``limit`` bytes: the form's one
  file, under any field name (where it has several, the one named ``image``)."""
  if not request.headers.get('content-type', '').lower().startswith('multipart/'):
    return await read_body(request, limit)
  await check_length(request, limit)  # the form parser streams the body itself
  try:
    form = await request.form(max_files=4, max_fields=16, max_part_size=limit)
  except ClientDisconnect:
    raise
  except Exception as e:
    detail = getattr(e, 'detail', None) or str(e) or type(e).__name__
    raise ApiError(400, f'The multipart form could not be parsed ({str(detail).rstrip(".")}); '
                   'send one image file (curl -F image=@photo.jpg).') from None
  try:
    return await _form_file(form.multi_items()).read()
  finally:
    await form.close()


def _form_file(items: list[tuple[str, Any]]) -> UploadFile:
  """The one file of a form's ``(field, value)`` items, or the one named image of several."""
  files = [(k, v) for k, v in items if isinstance(v, UploadFile)]
  named = [v for k, v in files if k == 'image']
  if len(files) == 1 or len(named) == 1:
    return named[0] if named else files[0][1]
  if named:
    raise ApiError(400, f'The form has {len(named)} files named image; send one (curl -F '
                   'image=@photo.jpg).')
  if files:
    raise ApiError(400, f'The form has {len(files)} files and none named image; send one file, '
                   'or name the one to classify image (curl -F image=@photo.jpg).')
  text = [k for k, v in items if isinstance(v, str)]
  if text:   # a part without a filename: curl -F image=<photo.jpg sends one
    name = 'image' if 'image' in text else text[0][:40]
    raise ApiError(400, f"The form field '{name}' has no filename, so it is not a file upload; "
                   f'send the image as a file (curl -F {name}=@photo.jpg).')
  raise ApiError(400, 'The form has no file; send one image file (curl -F image=@photo.jpg).')


def json_body(body: bytes) -> Any:
  try:
    return json.loads(body)
  except RecursionError:
    raise ApiError(400, "The body's JSON is nested too deeply; send the request shape shown at "
                   '/docs.') from None
  except (ValueError, UnicodeDecodeError):
    raise ApiError(400, 'The body is not valid JSON.') from None


def instances(payload: Any, shape: tuple[int, int, int]) -> list[bytes | np.ndarray]:
  """The images of ``{"instances": [...]}``, each ``{"b64": "<image file>"}`` (image bytes, to
  decode) or the signature's uint8 pixels, an HxWxC nested list (``shape``; HxW when C is 1),
  either also under the input's name (``{"images": ...}``)."""
  h, w, c = shape
  usage = (f'send {{"instances": [{{"b64": "<base64 image>"}}, ...]}} or {h}x{w}x{c} lists of '
           'integers 0..255 (the signature\'s uint8 images)')
  if not isinstance(payload, dict) or not isinstance(payload.get('instances'), list) or \
      not payload['instances']:
    raise ApiError(400, f'The body has no non-empty "instances" list; {usage}.')
  if payload.get('signature_name', 'serving_default') != 'serving_default':
    raise ApiError(400, f"Unknown signature_name {payload['signature_name']!r}; use "
                   "'serving_default'.")
  out: list[bytes | np.ndarray] = []
  for i, inst in enumerate(payload['instances']):
    if isinstance(inst, dict) and len(inst) == 1 and 'b64' not in inst:
      inst = next(iter(inst.values()))     # the named-input form {"images": ...}
    if isinstance(inst, list):
      out.append(_pixels(inst, shape, f'Instance {i}'))
      continue
    if not isinstance(inst, dict) or not isinstance(inst.get('b64'), str):
      raise ApiError(400, f'Instance {i} is neither {{"b64": "<base64 image>"}} nor pixels; '
                     f'{usage}.')
    try:
      out.append(base64.b64decode(inst['b64'], validate=True))
    except (binascii.Error, ValueError):
      raise ApiError(400, f'Instance {i} is not valid base64.') from None
  return out


def _has_bool(values: Any) -> bool:
  """JSON ``true`` / ``false`` among integers: numpy reads them as 1 / 0, so they would pass as
  pixels."""
  return any(type(v) is bool for v in np.asarray(values, dtype=object).ravel())


def _pixels(rows: list, shape: tuple[int, int, int], what: str) -> np.ndarray:
  """An HxWxC uint8 image from nested lists of integers 0..255 (HxW for one channel)."""
  try:  # no dtype: floats, booleans and strings keep a dtype refused below
    data = np.asarray(rows)
  except (TypeError, ValueError, OverflowError):
    data = None
  if data is not None and data.ndim == 2 and shape[2] == 1:
    data = data[..., None]
  if data is None or data.shape != tuple(shape) or data.dtype.kind not in 'iu' or (
      data.min() < 0 or data.max() > 255) or _has_bool(rows):
    raise ApiError(400, f"{what} must be {'x'.join(map(str, shape))} integers 0..255 (the "
                   'model input, already resized), or {"b64": "<base64 image>"}.')
  return data.astype(np.uint8)


def v2_images(payload: Any, shape: tuple[int, int, int]) -> np.ndarray:
  """The uint8 NxHxWxC images of a KServe v2 request's one ``UINT8`` input tensor."""
  want = (f'one input {{"name": "images", "datatype": "UINT8", "shape": '
          f'[N, {", ".join(map(str, shape))}], "data": [...]}}')
  inputs = payload.get('inputs') if isinstance(payload, dict) else None
  if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
    raise ApiError(400, f'The body must have {want}.')
  tensor = inputs[0]
  if tensor.get('name', 'images') != 'images':
    raise ApiError(400, f"No input named '{str(tensor['name'])[:40]}'; this model's one input is "
                   "'images'.")
  dims = tensor.get('shape')
  if (tensor.get('datatype') != 'UINT8' or not isinstance(dims, list) or len(dims) != 4 or
      tuple(dims[1:]) != tuple(shape) or any(type(d) is not int for d in dims) or dims[0] < 1):
    raise ApiError(400, f'The input tensor must be {want} (images already resized to the '
                   'model input).')
  try:  # no dtype: floats, booleans, strings and huge integers keep a dtype refused below
    data = np.asarray(tensor.get('data'))
  except (TypeError, ValueError, OverflowError):
    data = None
  if data is None or (data.size and data.dtype.kind not in 'iu') or _has_bool(tensor['data']):
    raise ApiError(400, 'The input tensor data must be a list of integers 0..255.')
  size = math.prod(dims)  # Python ints: np.prod wraps around for a huge N
  if data.size != size or (data.size and (data.min() < 0 or data.max() > 255)):
    raise ApiError(400, f'The input tensor data must hold {size} integers 0..255.')
  return data.astype(np.uint8).reshape(dims)


def v2_outputs(payload: dict[str, Any], names: tuple[str, ...]) -> tuple[str, ...]:
  """The output tensors a KServe v2 request asks for (its ``outputs``: ``[{"name": ...}]``), in
  its order; all of ``names`` when it names none."""
  asked = payload.get('outputs')
  if asked is None:
    return names
  if (not isinstance(asked, list) or not asked
      or not all(isinstance(o, dict) and isinstance(o.get('name'), str) for o in asked)):
    raise ApiError(400, 'The request\'s "outputs" must be a list of {"name": ...} objects naming '
                   f'{" and/or ".join(names)} (or be left out for both).')
  wanted = [o['name'] for o in asked]
  unknown = [n for n in wanted if n not in names]
  if unknown:
    raise ApiError(400, f"No output named '{unknown[0][:40]}'; this model's outputs are "
                   f"{', '.join(names)}.")
  return tuple(dict.fromkeys(wanted))
