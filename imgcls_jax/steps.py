"""The pure training step: its configuration (``StepConfig``), the input normalisation, the losses,
the weight EMA and the BatchNorm statistics pass. No I/O, no globals, no device logic. The
inference side (the one forward pass and what evaluation, prediction, export and serving compute
from it) is ``eval_steps.py``.

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

from imgcls_jax import device_augment, distill, mixup, weights
from imgcls_jax.models import layers
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
  # Dotted names of frozen parameters (e.g. a frozen patch-whitening kernel): their gradient is
  # stopped in the loss, so XLA never computes it (their optimizer updates are zero anyway).
  frozen: tuple[str, ...] = ()
  device_flip: bool = False                 # random horizontal flip per example, in the step
  # config.data.device_preprocess parsed (device_augment.parse): ops run on the uint8 batch in the
  # step, after device_flip; flip_alternate places rows in epochs by these two numbers.
  device_ops: tuple[tuple[Any, ...], ...] = ()
  epoch_chunk: int = 0                      # rows of each global batch one read slice fills
  epoch_examples: int = 0                   # examples per epoch of one read slice
  ema_decay: float = 0.0                    # weight EMA after every step (0: off)
  ema_warmup: bool = True                   # decay_t = min(decay, (1 + t) / (10 + t))
  accumulation: int = 1                     # micro-batches per step (gradients summed)
  class_weights: tuple[float, ...] | None = None   # per-class loss weights (None: all 1)
  focal_gamma: float = 0.0                  # > 0: focal loss
  logit_offsets: tuple[float, ...] | None = None   # added to the logits in the training loss only
  multilabel: bool = False                  # labels are multi-hot rows: sigmoid + binary CE
  pos_weight: tuple[float, ...] | None = None      # multi-label: weight of each class's positives
  thresholds: tuple[float, ...] | None = None      # multi-label: per-class decision thresholds
  temperature: float = 1.0                  # inference logits are divided by it (temperature.py)
  distill: distill.DistillConfig | None = None     # a teacher's term in the loss (None: off)


def step_config(config: Any, num_classes: int, *, probe_head: str = '',
                frozen: frozenset[str] = frozenset(),
                class_weights: tuple[float, ...] | None = None,
                logit_offsets: tuple[float, ...] | None = None, multilabel: bool = False,
                pos_weight: tuple[float, ...] | None = None,
                thresholds: tuple[float, ...] | None = None,
                temperature: float = 1.0) -> StepConfig:
  """The step's numbers from a run's config (``run.setup``; ``class_weights``, ``logit_offsets``
  and ``pos_weight`` are resolved there from the training split's class counts, and for
  flip_alternate ``epoch_chunk`` / ``epoch_examples`` from the training stream's layout)."""
  loss = config.get('loss') or {}
  device = config.data.get('device_preprocess', '') or ''
  return StepConfig(num_classes=num_classes, multilabel=multilabel, pos_weight=pos_weight,
                    thresholds=thresholds, temperature=float(temperature),
                    class_weights=class_weights, logit_offsets=logit_offsets,
                    focal_gamma=float(loss.get('focal_gamma', 0.0) or 0.0),
                    label_smoothing=float(config.label_smoothing),
                    mean=tuple(float(m) for m in config.data.mean),
                    std=tuple(float(s) for s in config.data.std),
                    compute_dtype=config.dtype,
                    mix=mixup.from_config(config.get('mixup')),
                    probe_head=probe_head, frozen=tuple(sorted(frozen)),
                    # 'flip_lr' alone keeps its own flag (the same draws as the op).
                    device_flip=device == 'flip_lr',
                    device_ops=() if device == 'flip_lr' else device_augment.parse(device),
                    ema_decay=ema_decay(config), ema_warmup=bool(config.get('ema', {}).get(
                        'warmup', True)),
                    accumulation=int(config.get('grad_accumulation_steps', 1) or 1))


def ema_decay(config: Any) -> float:
  """``config.ema.decay`` (0.0 when the config has no EMA section: older runs)."""
  ema = config.get('ema')
  return float(ema.get('decay', 0.0)) if ema else 0.0


def uses_ema(config: Any) -> bool:
  """Whether a run of ``config`` (a ConfigDict or its dict) evaluates, predicts, serves and hands
  on (transfer) its weight EMA rather than its weights (``config.ema.inference``)."""
  return ema_decay(config) > 0 and bool(config['ema'].get('inference', True))


# fold_in data for the mixup / cutmix key; the dropout streams use fold_in(key, 0..n) instead.
MIX_STREAM = 0x6D1C
FLIP_STREAM = device_augment.FLIP_STREAM
random_flip = device_augment.random_flip  # each image mirrored with probability 1/2, from a key


def normalize(images_BxHxWxC: jax.Array, cfg: StepConfig) -> jax.Array:
  """uint8 images -> ``(x / 255 - mean) / std`` in the compute dtype (done on the device)."""
  x = images_BxHxWxC.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(cfg.mean, jnp.float32)) / jnp.asarray(cfg.std, jnp.float32)
  return x.astype(cfg.compute_dtype)


def targets(labels_B: jax.Array, cfg: StepConfig) -> jax.Array:
  """Smoothed one-hot targets ``targets_BxK`` (multi-label: the multi-hot rows, smoothed as
  timm's BinaryCrossEntropy does: ``y (1 - s) + s / K``)."""
  if cfg.multilabel:
    hot = labels_B.astype(jnp.float32)
    return hot * (1.0 - cfg.label_smoothing) + cfg.label_smoothing / cfg.num_classes
  onehot = jax.nn.one_hot(labels_B, cfg.num_classes, dtype=jnp.float32)
  return optax.smooth_labels(onehot, cfg.label_smoothing) if cfg.label_smoothing else onehot


def cross_entropy(logits_BxK: jax.Array, targets_BxK: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy ``loss_B`` in f32."""
  return optax.softmax_cross_entropy(logits_BxK.astype(jnp.float32), targets_BxK)


def sigmoid_cross_entropy(logits_BxK: jax.Array, targets_BxK: jax.Array,
                          pos_weight: tuple[float, ...] | None = None) -> jax.Array:
  """Per-example binary cross-entropy ``loss_B``, the mean over the K classes of
  ``-(w_k y log s(x) + (1 - y) log s(-x))`` (PyTorch's ``BCEWithLogitsLoss(pos_weight=w)``)."""
  x = logits_BxK.astype(jnp.float32)
  w = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  loss = -(w * targets_BxK * jax.nn.log_sigmoid(x) + (1.0 - targets_BxK) * jax.nn.log_sigmoid(-x))
  return loss.mean(axis=-1)


def weighted_loss_terms(logits_BxK: jax.Array, targets_BxK: jax.Array,
                        cfg: StepConfig) -> tuple[jax.Array, jax.Array]:
  """(per-example loss ``l_B``, per-example class weight ``w_B``): ``l = -sum_k t_k (1 - p_k)^gamma
  log p_k`` (focal scaling when ``gamma > 0``) and ``w = sum_k c_k h_k`` over the targets before
  label smoothing ``h`` (the example's own class, or its mixup pair), so ``sum(w l) / sum(w)`` is
  PyTorch's weighted cross-entropy, and smoothing mass never carries a rare class's weight."""
  log_p = jax.nn.log_softmax(logits_BxK.astype(jnp.float32), axis=-1)
  scale = (1.0 - jnp.exp(log_p)) ** cfg.focal_gamma if cfg.focal_gamma > 0 else 1.0
  loss_B = -jnp.sum(targets_BxK * scale * log_p, axis=-1)
  if cfg.class_weights is None:
    return loss_B, jnp.ones(loss_B.shape, jnp.float32)
  k = logits_BxK.shape[-1]
  hard = ((targets_BxK - cfg.label_smoothing / k) / (1.0 - cfg.label_smoothing)
          if cfg.label_smoothing else targets_BxK)      # optax.smooth_labels, undone (linear)
  return loss_B, hard @ jnp.asarray(cfg.class_weights, jnp.float32)


def _micro_batches(tree: Any, k: int) -> Any:
  """``B x ...`` arrays -> ``k x B/k x ...``: micro-batch j holds rows j, k + j, 2k + j, ... (each
  device keeps its own rows: no data moves between devices)."""
  return jax.tree.map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1), tree)


def train_step(state: TrainState, batch: dict[str, jax.Array], teachers: Any = None, *,
               model_def: ModelDef, tx: optax.GradientTransformation,
               lr_schedule: optax.Schedule, cfg: StepConfig,
               teacher_defs: tuple[ModelDef, ...] = ()) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; BN statistics are taken over the whole global batch
  (over each micro-batch with ``cfg.accumulation`` > 1; a linear probe, ``cfg.probe_head``, keeps
  the source model's statistics instead), over its rows with ``batch['mask']`` True only (as the
  loss). With ``cfg.distill``, ``teachers`` (a tuple of the teachers' variables, graphs
  ``teacher_defs``) see the same augmented images and add their term to the loss
  (``distill.py``)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = batch['image']
  if cfg.device_flip:
    images = random_flip(jax.random.fold_in(key, FLIP_STREAM), images)
  if cfg.device_ops:
    images = device_augment.apply(cfg.device_ops, images, step_key=key,
                                  run_key=jax.random.wrap_key_data(state.rng), step=state.step,
                                  epoch_chunk=cfg.epoch_chunk, epoch_examples=cfg.epoch_examples)
  x = normalize(images, cfg)
  y = targets(batch['label'], cfg)
  if cfg.mix is not None:  # soft targets from mixed pairs of the global batch
    x, y = mixup.apply(jax.random.fold_in(key, MIX_STREAM), x, y, cfg.mix, batch.get('mask'))

  def teach(x_mb):   # the teachers' probabilities of (micro-)batch rows, or None
    return None if cfg.distill is None else distill.teacher_probabilities(
        teacher_defs, teachers, x_mb, cfg.distill, cfg.multilabel)

  # Image folders mark rows whose file failed to decode (mask False): they add nothing to the loss
  # and are left out of the BatchNorm statistics (layers.batch_rows; None: no mask traced at all).
  rows_B = batch.get('mask')
  weights_B = rows_B.astype(jnp.float32) if rows_B is not None else jnp.ones(x.shape[:1])
  count = jnp.maximum(weights_B.sum(), 1.0)
  plain = cfg.class_weights is None and cfg.focal_gamma == 0 and cfg.logit_offsets is None
  if not plain:  # the loss divides by the summed class weights of the batch's (real) examples
    weights_B = weights_B * weighted_loss_terms(jnp.zeros(y.shape), y, cfg)[1]
    loss_norm = jnp.maximum(weights_B.sum(), 1e-12)

  def loss_fn(params, batch_stats, x, y, w, rows, t, micro):
    if cfg.probe_head:  # frozen backbone: no gradient flows into it, so XLA drops its backward
      params = {k: v if k == cfg.probe_head else jax.lax.stop_gradient(v)
                for k, v in params.items()}
    if cfg.frozen:      # e.g. a frozen whitening conv: no filter-gradient convolution at all
      params = weights.map_named(
          lambda n, v: jax.lax.stop_gradient(v) if n in cfg.frozen else v, params)
    dropout_key = key if isinstance(micro, int) else jax.random.fold_in(key, micro)
    model = model_def.merge(params, batch_stats, dropout_key)
    with layers.batch_rows(rows):
      logits = model(x, train=not cfg.probe_head)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    if not plain:
      shifted = logits if cfg.logit_offsets is None else (
          logits.astype(jnp.float32) + jnp.asarray(cfg.logit_offsets, jnp.float32))
      terms = weighted_loss_terms(shifted, y, cfg)[0]
      if t is not None:
        terms = distill.blend(terms, logits, t, cfg.distill, cfg.multilabel)
      return (terms * w).sum() / loss_norm, (logits, new_stats)
    if cfg.multilabel:
      per_example = sigmoid_cross_entropy(logits, y, cfg.pos_weight)
    else:
      per_example = cross_entropy(logits, y)
    if t is not None:
      per_example = distill.blend(per_example, logits, t, cfg.distill, cfg.multilabel)
    if 'mask' not in batch and cfg.accumulation == 1:
      return per_example.mean(), (logits, new_stats)
    return (per_example * w).sum() / count, (logits, new_stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if cfg.accumulation == 1:
    t_probs = teach(x)
    (loss, (logits, new_stats)), grads = grad_fn(state.params, state.batch_stats, x, y, weights_B,
                                                 rows_B, t_probs, 0)
  else:  # k micro-batches in sequence: summed gradients, BN statistics carried through
    def micro_step(carry, xs):   # the teachers too see one micro-batch at a time (memory)
      grads, stats, loss = carry
      x_mb, y_mb, w_mb, rows_mb, j = xs
      t = teach(x_mb)
      (l, (logits, stats)), g = grad_fn(state.params, stats, x_mb, y_mb, w_mb, rows_mb, t, j)
      return (jax.tree.map(jnp.add, grads, g), stats, loss + l), (logits, t)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    micro = (*_micro_batches((x, y, weights_B, rows_B), cfg.accumulation),
             jnp.arange(cfg.accumulation))
    (grads, new_stats, loss), (logits_k, t_k) = jax.lax.scan(
        micro_step, (zeros, state.batch_stats, jnp.zeros((), jnp.float32)), micro)
    def batch_order(a_k):   # k x B/k x K -> B x K, rows back in batch order
      return a_k.swapaxes(0, 1).reshape(-1, a_k.shape[-1])
    logits = batch_order(logits_k)
    t_probs = None if t_k is None else batch_order(t_k)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if cfg.multilabel:  # exact match of the tag set at threshold 0.5 (sklearn's subset accuracy)
    correct_B = jnp.all((logits >= 0) == (batch['label'] > 0), axis=-1).astype(jnp.float32)
  else:
    correct_B = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  metrics = {
      'loss': loss,
      'accuracy': (correct_B * weights_B).sum() / count,
      'learning_rate': lr_schedule(state.step),
      'grad_norm': optax.global_norm(grads),
  }
  if t_probs is not None:   # how often the student decides as its teachers do
    same_B = (jnp.mean(((logits >= 0) == (t_probs >= 0.5)).astype(jnp.float32), axis=-1)
              if cfg.multilabel else
              (jnp.argmax(logits, -1) == jnp.argmax(t_probs, -1)).astype(jnp.float32))
    real_B = batch['mask'].astype(jnp.float32) if 'mask' in batch else jnp.ones(same_B.shape)
    metrics['teacher_agreement'] = (same_B * real_B).sum() / count
  ema = state.ema
  if cfg.ema_decay > 0:
    ema = update_ema(ema, params, new_stats, state.step, cfg)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state, ema=ema)
  return new_state, metrics


def update_ema(ema: dict[str, Any], params: Any, batch_stats: Any, step: jax.Array,
               cfg: StepConfig) -> dict[str, Any]:
  """``ema = d * ema + (1 - d) * new`` for parameters and BN statistics; with warmup
  ``d = min(decay, (1 + t) / (10 + t))`` at step t (the step just taken)."""
  d = jnp.asarray(cfg.ema_decay, jnp.float32)
  if cfg.ema_warmup:
    t = step.astype(jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  mix = lambda e, v: (d * e.astype(jnp.float32) + (1 - d) * v.astype(jnp.float32)).astype(e.dtype)  # noqa: E731
  return {'params': jax.tree.map(mix, ema['params'], params),
          'batch_stats': jax.tree.map(mix, ema['batch_stats'], batch_stats)}


def batch_statistics(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *,
                     model_def: ModelDef, cfg: StepConfig) -> Any:
  """The BatchNorm statistics of one batch at ``params``: the model in training mode with every
  norm layer's momentum set to 0, so its running statistics become this batch's (mean and biased
  variance of each layer's input, over the global batch, its rows with ``batch['mask']`` True
  only when it has one; with ``cfg.accumulation`` = k > 1, the mean over the k micro-batches the
  train step normalises with, one at a time). ``batch_stats`` gives the tree's shape only. No
  loss, no gradient; device augmentation is not applied."""
  def stats_of(x, rows):
    model = model_def.merge(params, batch_stats)
    for _, module in nnx.iter_modules(model):
      if any(isinstance(v, nnx.BatchStat) for v in vars(module).values()):
        module.momentum = 0.0
    with layers.batch_rows(rows):
      model(x, train=True)
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  x = normalize(batch['image'], cfg)
  rows_B = batch.get('mask')
  if cfg.accumulation == 1:
    return stats_of(x, rows_B)
  per_micro = jax.lax.map(lambda xs: stats_of(*xs),
                          _micro_batches((x, rows_B), cfg.accumulation))
  return jax.tree.map(lambda a: a.mean(axis=0), per_micro)
