"""Pure train / eval steps, the one inference forward pass, and the loss. No I/O, no globals, no
device logic.

``run.py`` binds the static arguments with ``functools.partial`` and jits these with explicit
shardings (and a donated state for training).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imgcls_jax import mixup, report
from imgcls_jax.state import ModelDef, TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The numbers a step needs (all from the config; hashable so jit treats them as static)."""
  num_classes: int
  label_smoothing: float = 0.0
  mean: tuple[float, ...] = (0.5,)          # per channel, in [0, 1] units
  std: tuple[float, ...] = (0.5,)
  compute_dtype: str = 'float32'
  mix: mixup.MixConfig | None = None        # mixup / cutmix on the device (None: off)
  # Linear probe: the name of the head's top-level parameter group; every other parameter is
  # frozen and the model runs in inference mode (running BN statistics, no dropout). '' = off.
  probe_head: str = ''
  device_flip: bool = False                 # random horizontal flip per example, in the step


def step_config(config: Any, num_classes: int, *, probe_head: str = '') -> StepConfig:
  """The step's numbers from a run's config (``run.setup``)."""
  return StepConfig(num_classes=num_classes,
                    label_smoothing=float(config.label_smoothing),
                    mean=tuple(float(m) for m in config.data.mean),
                    std=tuple(float(s) for s in config.data.std),
                    compute_dtype=config.dtype,
                    mix=mixup.from_config(config.get('mixup')),
                    probe_head=probe_head,
                    device_flip=config.data.get('device_preprocess', '') == 'flip_lr')


# fold_in data for the mixup / cutmix key; the dropout streams use fold_in(key, 0..n) instead.
MIX_STREAM = 0x6D1C
FLIP_STREAM = 0x0F11


def random_flip(key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """Each image mirrored left-right with probability 1/2 (one draw per example from ``key``)."""
  flip_B = jax.random.bernoulli(key, 0.5, images_BxHxWxC.shape[:1])
  return jnp.where(flip_B[:, None, None, None], images_BxHxWxC[:, :, ::-1, :], images_BxHxWxC)


def normalize(images_BxHxWxC: jax.Array, cfg: StepConfig) -> jax.Array:
  """uint8 images -> ``(x / 255 - mean) / std`` in the compute dtype (done on the device)."""
  x = images_BxHxWxC.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)
  return x.astype(cfg.compute_dtype)


def targets(labels_B: jax.Array, cfg: StepConfig) -> jax.Array:
  """Smoothed one-hot targets ``targets_BxK``."""
  onehot = jax.nn.one_hot(labels_B, cfg.num_classes, dtype=jnp.float32)
  return optax.smooth_labels(onehot, cfg.label_smoothing) if cfg.label_smoothing else onehot


def cross_entropy(logits_BxK: jax.Array, targets_BxK: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy ``loss_B`` in f32."""
  return optax.softmax_cross_entropy(logits_BxK.astype(jnp.float32), targets_BxK)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model_def: ModelDef,
               tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; BN statistics are taken over the whole global batch
  (a linear probe, ``cfg.probe_head``, keeps the source model's statistics instead)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = batch['image']
  if cfg.device_flip:
    images = random_flip(jax.random.fold_in(key, FLIP_STREAM), images)
  x = normalize(images, cfg)
  y = targets(batch['label'], cfg)
  if cfg.mix is not None:  # soft targets from mixed pairs of the global batch
    x, y = mixup.apply(jax.random.fold_in(key, MIX_STREAM), x, y, cfg.mix)

  def loss_fn(params):
    if cfg.probe_head:  # frozen backbone: no gradient flows into it, so XLA drops its backward
      params = {k: v if k == cfg.probe_head else jax.lax.stop_gradient(v)
                for k, v in params.items()}
    model = model_def.merge(params, state.batch_stats, key)
    logits = model(x, train=not cfg.probe_head)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    if weights_B is None:
      return cross_entropy(logits, y).mean(), (logits, new_stats)
    return (cross_entropy(logits, y) * weights_B).sum() / count, (logits, new_stats)

  # Image folders mark rows whose file failed to decode (mask False): they add nothing to the loss.
  weights_B = batch['mask'].astype(jnp.float32) if 'mask' in batch else None
  count = jnp.maximum(weights_B.sum(), 1.0) if weights_B is not None else None
  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  correct_B = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  metrics = {
      'loss': loss,
      'accuracy': (correct_B.mean() if weights_B is None else (correct_B * weights_B).sum() / count),
      'learning_rate': lr_schedule(state.step),
      'grad_norm': optax.global_norm(grads),
  }
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state)
  return new_state, metrics


def forward(params: Any, batch_stats: Any, images_BxHxWxC: jax.Array, *, model_def: ModelDef,
            cfg: StepConfig) -> jax.Array:
  """The one inference forward pass: uint8 images -> ``logits_BxK`` (running BN statistics, no
  dropout). Evaluation, prediction, export and serving all run it."""
  model = model_def.merge(params, batch_stats)
  return model(normalize(images_BxHxWxC, cfg), train=False)


def log_probs_fn(variables: Any, images: jax.Array, *, model_def: ModelDef, cfg: StepConfig,
                 tta: str = '') -> jax.Array:
  """Inference log-probabilities ``BxK`` of ``variables`` (anything with ``params`` and
  ``batch_stats``: a TrainState or an InferenceState); with ``tta='flip'`` the mean of the
  probabilities of the images and of their horizontal mirror images (test-time augmentation)."""
  def log_softmax(x):
    logits = forward(variables.params, variables.batch_stats, x, model_def=model_def, cfg=cfg)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  log_probs = log_softmax(images)
  if tta == 'flip':
    log_probs = jnp.logaddexp(log_probs, log_softmax(images[:, :, ::-1, :])) - jnp.log(2.0)
  return log_probs


def eval_step(variables: Any, batch: dict[str, jax.Array], *, model_def: ModelDef,
              cfg: StepConfig, tta: str = '',
              num_bins: int = report.DEFAULT_CALIBRATION_BINS) -> dict[str, jax.Array]:
  """Masked sums over a padded batch: loss, top-1 and top-5 correct, example count, and the
  confusion-matrix and calibration sums of the evaluation report (``report.eval_sums``), of the
  predictions ``log_probs_fn`` makes with test-time augmentation ``tta``."""
  log_probs = log_probs_fn(variables, batch['image'], model_def=model_def, cfg=cfg, tta=tta)
  return report.eval_sums(log_probs, batch['label'], batch['mask'], num_bins)


def probabilities(variables: Any, images_BxHxWxC: jax.Array, *, model_def: ModelDef,
                  cfg: StepConfig) -> dict[str, jax.Array]:
  """``{'probabilities', 'logits'}`` (BxK float32) of uint8 images: what prediction returns."""
  logits = forward(variables.params, variables.batch_stats, images_BxHxWxC, model_def=model_def,
                   cfg=cfg).astype(jnp.float32)
  return {'probabilities': jax.nn.softmax(logits, -1), 'logits': logits}
