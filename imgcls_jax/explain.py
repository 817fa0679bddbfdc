"""What a prediction rests on: Grad-CAM and integrated gradients in JAX (under jit), the features
a model's head sees, and heat-map overlays.

Every model family is handled without touching its code: the model is merged from its state
inside the traced function, and the class of chosen submodules of that throw-away instance is
swapped for a subclass whose call goes through a hook (``tap``). So

* ``penultimate`` returns the input of the last ``nnx.Linear`` the forward pass calls (the head):
  the penultimate-layer features, for any family of the model table;
* ``gradcam`` (Selvaraju et al., 2017) takes the output of the last ``nnx.Conv`` called, adds a
  zero perturbation there and differentiates the target logit with respect to it:
  ``relu(sum_c mean_hw(dy/dA_c) * A_c)``, upsampled bilinearly to the image;
* ``integrated_gradients`` (Sundararajan et al., 2017) integrates input gradients along the
  straight path from a black image (midpoint rule, ``num_steps`` points): attributions sum to
  ``logit(x) - logit(black)`` up to the quadrature error.

``Explainer`` wraps a trained ``inference.Classifier``; the server and ``--mode=predict`` call it:
``Explainer(images_BxHxWxC uint8) -> {'heatmap': BxHxW in [0, 1], 'class_index': B}``, and
``overlay_png`` turns an image and its heat map into PNG bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax import inference, steps
from imgcls_jax.errors import UserError
from imgcls_jax.state import ModelDef

METHODS = ('gradcam', 'integrated_gradients')
# hook(call_index, module_call, x, *args, **kwargs) -> output of the tapped submodule.
Hook = Callable[..., Any]


def tap(model: nnx.Module, kind: type, hook: Hook) -> int:
  """Routes every call of each ``kind`` submodule of ``model`` through ``hook``; returns how many
  submodules were tapped. ``call_index`` counts calls in execution order. Only for a model merged
  inside the traced function: its submodules change class for good."""
  counter = [0]
  tapped = 0
  for _, module in list(nnx.iter_modules(model)):
    if not isinstance(module, kind):
      continue
    base = type(module)

    def call(self, x, *args, _base=base, **kwargs):
      i = counter[0]
      counter[0] += 1
      return hook(i, functools.partial(_base.__call__, self), x, *args, **kwargs)

    module.__class__ = type(f'Tapped{base.__name__}', (base,), {'__call__': call})
    tapped += 1
  return tapped


def penultimate(variables: Any, images_BxHxWxC: jax.Array, *, model_def: ModelDef,
                cfg: steps.StepConfig) -> jax.Array:
  """``features_BxD``: the (flattened) input of the head, the last ``nnx.Linear`` called."""
  model = model_def.merge(variables.params, variables.batch_stats)
  inputs: list[jax.Array] = []

  def record(i, call, x, *args, **kwargs):
    inputs.append(x)
    return call(x, *args, **kwargs)

  if not tap(model, nnx.Linear, record):
    raise UserError('The model has no nnx.Linear head, so it has no penultimate layer to embed; '
                    'use config.embed.extractor=classical or a model of the table.')
  model(steps.normalize(images_BxHxWxC, cfg), train=False)
  return inputs[-1].reshape(inputs[-1].shape[0], -1).astype(jnp.float32)


def _conv_forward(variables: Any, x: jax.Array, delta: jax.Array | None = None, add_at: int = -1,
                  *, model_def: ModelDef) -> tuple[jax.Array, list[jax.Array]]:
  """(logits, the output of every conv call in order); ``delta`` is added to call ``add_at``."""
  model = model_def.merge(variables.params, variables.batch_stats)
  outs: list[jax.Array] = []

  def hook(i, call, inp, *args, **kwargs):
    y = call(inp, *args, **kwargs)
    if delta is not None and i == add_at:
      y = y + delta.astype(y.dtype)
    outs.append(y)
    return y

  tap(model, nnx.Conv, hook)
  return model(x, train=False), outs


def conv_outputs(variables: Any, image_shape: tuple[int, ...], *, model_def: ModelDef
                 ) -> list[jax.ShapeDtypeStruct]:
  """Shapes of the outputs of the convolutions the forward pass calls, in order (shape-only)."""
  found: list[list[Any]] = []

  def shapes(v, x):
    _, outs = _conv_forward(v, x, model_def=model_def)
    found.append([jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs])
    return jnp.zeros(())

  jax.eval_shape(shapes, variables, jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32))
  return found[0]


def _targets(logits_BxK: jax.Array, target_B: jax.Array | None) -> jax.Array:
  return jnp.argmax(logits_BxK, -1) if target_B is None else target_B.astype(jnp.int32)


def gradcam(variables: Any, images_BxHxWxC: jax.Array, target_B: jax.Array | None = None, *,
            model_def: ModelDef, cfg: steps.StepConfig) -> dict[str, jax.Array]:
  """``{'heatmap': BxHxW in [0, 1], 'class_index': B}``: Grad-CAM of ``target_B`` (None: the
  predicted class) at the last convolution's output, upsampled to the image size."""
  x = steps.normalize(images_BxHxWxC, cfg).astype(jnp.float32)
  convs = conv_outputs(variables, x.shape, model_def=model_def)
  if not convs:
    raise UserError('Grad-CAM needs a convolutional model, but this model calls no nnx.Conv; '
                    "use config.predict.explain='integrated_gradients', which works for any model.")

  def target_logit(delta):
    logits, outs = _conv_forward(variables, x, delta, len(convs) - 1, model_def=model_def)
    t = jax.lax.stop_gradient(_targets(logits, target_B))
    picked = jnp.take_along_axis(logits.astype(jnp.float32), t[:, None], axis=-1)
    return picked.sum(), (t, outs[-1])

  zero = jnp.zeros(convs[-1].shape, jnp.float32)
  grads_BxhxwxC, (t, act_BxhxwxC) = jax.grad(target_logit, has_aux=True)(zero)
  weights_BxC = grads_BxhxwxC.mean(axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum('bhwc,bc->bhw', act_BxhxwxC.astype(jnp.float32), weights_BxC))
  b, h, w = images_BxHxWxC.shape[:3]
  cam = jax.image.resize(cam, (b, h, w), 'bilinear')
  return {'heatmap': _unit_max(jax.nn.relu(cam)), 'class_index': t}


def integrated_gradients(variables: Any, images_BxHxWxC: jax.Array,
                         target_B: jax.Array | None = None, *, model_def: ModelDef,
                         cfg: steps.StepConfig, num_steps: int = 32) -> dict[str, jax.Array]:
  """``{'attribution': BxHxWxC, 'heatmap': BxHxW in [0, 1], 'class_index': B}``: integrated
  gradients of the target logit from a black image, in logit units per input pixel (of [0, 1]
  intensities); the heat map is the absolute attribution summed over channels."""
  x = images_BxHxWxC.astype(jnp.float32) / 255.0
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)

  def logits_of(x01):
    model = model_def.merge(variables.params, variables.batch_stats)
    return model(((x01 - mean) / std).astype(cfg.compute_dtype), train=False).astype(jnp.float32)

  t = jax.lax.stop_gradient(_targets(logits_of(x), target_B))

  def picked(x01):
    return jnp.take_along_axis(logits_of(x01), t[:, None], axis=-1).sum()

  def body(total, alpha):
    return total + jax.grad(picked)(alpha * x), None

  alphas = (jnp.arange(num_steps, dtype=jnp.float32) + 0.5) / num_steps
  total, _ = jax.lax.scan(body, jnp.zeros_like(x), alphas)
  attribution = x * total / num_steps
  return {'attribution': attribution, 'heatmap': _unit_max(jnp.abs(attribution).sum(-1)),
          'class_index': t}


def _unit_max(maps_BxHxW: jax.Array) -> jax.Array:
  peak = maps_BxHxW.max(axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, maps_BxHxW / jnp.where(peak > 0, peak, 1.0), 0.0)


@dataclasses.dataclass
class Explainer:
  """Heat maps of a trained classifier: ``explainer(images) -> {'heatmap', 'class_index'}``."""
  clf: inference.Classifier
  method: str
  ig_steps: int = 32

  def __post_init__(self):
    if self.method not in METHODS:
      raise UserError(f"Unknown explanation method '{self.method}'; use one of "
                      f"{', '.join(METHODS)} (config.predict.explain).")
    if self.method == 'integrated_gradients' and int(self.ig_steps) < 1:
      raise UserError(f'config.predict.ig_steps={self.ig_steps} must be >= 1 (the number of '
                      'steps of the path integral; e.g. 32).')
    if self.method == 'gradcam' and not conv_outputs(
        self.clf.variables, (1,) + tuple(self.clf.image_shape), model_def=self.clf.model_def):
      raise UserError(f"Grad-CAM needs a convolutional model, but '{self.clf.run.model.name}' "
                      "has no convolution (nnx.Conv); use config.predict.explain="
                      "'integrated_gradients', which works for any model.")

  @functools.cached_property
  def _jitted(self) -> Any:
    kw = dict(model_def=self.clf.model_def, cfg=self.clf.step_cfg)
    if self.method == 'gradcam':
      fn = functools.partial(gradcam, **kw)
    else:
      fn = functools.partial(integrated_gradients, num_steps=self.ig_steps, **kw)
    def run(variables, images, target):
      res = fn(variables, images, target)
      return {'heatmap': res['heatmap'], 'class_index': res['class_index']}

    return jax.jit(run)

  def __call__(self, images_BxHxWxC: np.ndarray, target_B: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
    """Heat maps (float32 BxHxW in [0, 1]) and the explained class of uint8 images; targets
    default to the predicted classes. Batches are padded to a power of two (few compiles)."""
    n = len(images_BxHxWxC)
    out: dict[str, list[np.ndarray]] = {'heatmap': [], 'class_index': []}
    for start in range(0, n, self.clf.max_batch):
      chunk = np.asarray(images_BxHxWxC[start:start + self.clf.max_batch], np.uint8)
      size = min(self.clf.max_batch, 1 << max(0, len(chunk) - 1).bit_length())
      padded = np.zeros((size,) + tuple(self.clf.image_shape), np.uint8)
      padded[:len(chunk)] = chunk
      targets = np.zeros((size,), np.int32)
      if target_B is not None:
        targets[:len(chunk)] = np.asarray(target_B)[start:start + len(chunk)]
      res = jax.device_get(self._jitted(self.clf.variables, padded,
                                        None if target_B is None else targets))
      for k in out:
        out[k].append(np.asarray(res[k][:len(chunk)]))
    h, w = self.clf.image_shape[:2]
    return {'heatmap': np.concatenate(out['heatmap']) if n else np.zeros((0, h, w), np.float32),
            'class_index': np.concatenate(out['class_index']) if n else np.zeros((0,), np.int32)}


def explainer(clf: inference.Classifier, method: str, *, ig_steps: int = 32) -> Explainer:
  """The server's entry point: an ``Explainer`` of ``clf`` (UserError for an unknown method, or
  Grad-CAM of a model without a convolution)."""
  return Explainer(clf, method, ig_steps)


def overlay(image_HxWxC: np.ndarray, heat_HxW: np.ndarray, *, alpha: float = 0.45,
            min_size: int = 224) -> np.ndarray:
  """uint8 RGB: the image (upscaled, nearest, to at least ``min_size`` pixels a side) under the
  heat map in the 'jet' colour map (bilinear upscaling)."""
  import matplotlib
  from PIL import Image
  image = np.asarray(image_HxWxC, np.uint8)
  rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
  h, w = rgb.shape[:2]
  scale = max(1, -(-min_size // min(h, w)))
  size = (w * scale, h * scale)
  big = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST), np.float32)
  heat = np.asarray(Image.fromarray(np.asarray(heat_HxW, np.float32)).resize(
      size, Image.Resampling.BILINEAR))
  colour = matplotlib.colormaps['jet'](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
  return np.clip((1 - alpha) * big + alpha * colour, 0, 255).astype(np.uint8)


def overlay_png(image_HxWxC: np.ndarray, heat_HxW: np.ndarray, path: str | None = None,
                **kwargs: Any) -> bytes:
  """The ``overlay`` as PNG bytes (also written to ``path`` when given)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(overlay(image_HxWxC, heat_HxW, **kwargs)).save(buf, format='PNG')
  data = buf.getvalue()
  if path:
    with open(path, 'wb') as f:
      f.write(data)
  return data
