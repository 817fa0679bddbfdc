"""A plain Flax (Linen) ResNet-50 v1.5 train step, written independently of ``imgcls_jax``.

The yardstick for ``throughput.py``: the model and step follow the Flax ImageNet example
(``examples/imagenet``: Linen ResNet with ``dtype`` compute, BatchNorm momentum 0.9 / eps 1e-5,
zero-initialised last BN scale per block, cross-entropy on one-hot labels plus an L2 penalty of
``weight_decay / 2 * sum(w**2)`` over kernels, SGD with Nesterov momentum 0.9 and a warmup + cosine
schedule, loss / accuracy / learning-rate metrics), but on one device with ``jax.jit`` and a
donated state instead of ``pmap``. Its inputs are already-normalised images in the compute dtype,
as the example's input pipeline delivers them. Timing is ``benchmarks/measure.py``'s, the same as
for the project's step, so the two figures compare like with like.

  python benchmarks/reference_flax.py --batch_size=256 --image_size=224 --dtype=bfloat16 --json
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax.training import train_state  # noqa: E402

from benchmarks import measure  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_integer('batch_size', 256, 'Batch size (one device).', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Synthetic image side.', flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1000, 'Classes.', flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.',
                  flag_values=FLAGS)
flags.DEFINE_list('stage_sizes', ['3', '4', '6', '3'], 'Bottleneck blocks per stage (3,4,6,3 = '
                  'ResNet-50; fewer only for smoke tests).', flag_values=FLAGS)
measure.define_flags(FLAGS)

WEIGHT_DECAY = 1e-4
BASE_LR = 0.1


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 x4, projection shortcut when the shape changes."""
  filters: int
  conv: Callable[..., Any]
  norm: Callable[..., Any]
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters * 4, (1, 1))(y))
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet v1.5: 7x7/2 stem, 3x3/2 max-pool, bottleneck stages, global average pool, dense."""
  stage_sizes: Sequence[int]
  num_classes: int
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = Bottleneck(64 * 2**i, conv=conv, norm=norm,
                       strides=(2, 2) if i > 0 and j == 0 else (1, 1))(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return jnp.asarray(x, jnp.float32)


class TrainState(train_state.TrainState):
  batch_stats: Any


def lr_schedule(steps_per_epoch: int = 1251, epochs: int = 90, warmup_epochs: int = 5) -> Any:
  """Linear warmup then cosine decay (the example's schedule at batch 1024 on ImageNet)."""
  warmup = warmup_epochs * steps_per_epoch
  return optax.join_schedules(
      [optax.linear_schedule(0.0, BASE_LR, warmup),
       optax.cosine_decay_schedule(BASE_LR, epochs * steps_per_epoch - warmup)], [warmup])


def create_state(model: ResNet, image_size: int, schedule: Any) -> TrainState:
  """Initialised parameters, BN statistics and SGD-Nesterov state."""
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.ones((1, image_size, image_size, 3), model.dtype))
  tx = optax.sgd(schedule, momentum=0.9, nesterov=True)
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables['batch_stats'])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, num_classes: int,
               schedule: Callable[[jax.Array], jax.Array]) -> tuple[TrainState, dict[str, Any]]:
  """Cross-entropy + L2 on kernels, one SGD step, BN statistics updated."""
  def loss_fn(params):
    logits, new_vars = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                      batch['image'], train=True, mutable=['batch_stats'])
    onehot = jax.nn.one_hot(batch['label'], num_classes)
    loss = optax.softmax_cross_entropy(logits, onehot).mean()
    l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params) if p.ndim > 1)
    return loss + WEIGHT_DECAY * 0.5 * l2, (new_vars, logits)

  (loss, (new_vars, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_vars['batch_stats'])
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
             'learning_rate': schedule(state.step)}
  return new_state, metrics


def run(*, batch_size: int, image_size: int, num_classes: int, dtype: str,
        stage_sizes: Sequence[int], num_steps: int, warmup: int, window: int,
        peak_tflops: float, guard: str = 'disallow', profile_dir: str = '',
        profile_steps: int = 5) -> dict[str, Any]:
  """Builds, compiles and times the reference step; returns the JSON record."""
  model = ResNet(stage_sizes=tuple(stage_sizes), num_classes=num_classes, dtype=jnp.dtype(dtype))
  schedule = lr_schedule()
  state = create_state(model, image_size, schedule)
  k1, k2 = jax.random.split(jax.random.key(1))
  batch = jax.jit(lambda: {
      'image': jax.random.normal(k1, (batch_size, image_size, image_size, 3), model.dtype),
      'label': jax.random.randint(k2, (batch_size,), 0, num_classes)})()
  jitted = jax.jit(functools.partial(train_step, num_classes=num_classes, schedule=schedule),
                   donate_argnums=0)
  compiled, info = measure.compile_step(jitted, state, batch)
  state, times, metrics = measure.time_steps(compiled, state, batch, warmup=warmup,
                                             steps=num_steps, window=window, guard=guard)
  if profile_dir:
    state = measure.profile_steps(compiled, state, batch, profile_dir, profile_steps)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  extra = {'model': 'resnet50' if tuple(stage_sizes) == (3, 4, 6, 3) else
           f'resnet_bottleneck{tuple(stage_sizes)}', 'dtype': dtype, 'image_size': image_size,
           'channels': 3, 'num_classes': num_classes, 'params': int(params), 'window': window,
           'warmup': warmup, 'mesh_devices': 1}
  return measure.result('flax_reference', batch_size=batch_size, step_times=times,
                        compile_info=info, peak_tflops=peak_tflops,
                        losses=[float(m['loss']) for m in metrics], extra=extra)


def main(argv: list[str]) -> None:
  """Parses flags, runs the reference benchmark, prints the record."""
  measure.parse_flags(FLAGS, argv)
  try:
    record = run(batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                 num_classes=FLAGS.num_classes, dtype=FLAGS.dtype,
                 stage_sizes=[int(s) for s in FLAGS.stage_sizes], num_steps=FLAGS.steps,
                 warmup=FLAGS.warmup, window=FLAGS.window, peak_tflops=FLAGS.peak_tflops,
                 guard=FLAGS.transfer_guard, profile_dir=FLAGS.profile_dir,
                 profile_steps=FLAGS.profile_steps)
  except ValueError as e:
    measure.fail(str(e))
  measure.emit(record, FLAGS.json)


if __name__ == '__main__':
  main(sys.argv)
