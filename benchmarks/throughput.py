"""Throughput of the project's real train step on synthetic, device-resident data.

  python benchmarks/throughput.py --config=configs/imagenet_resnet50.py --config.batch_size=256 \
      --peak_tflops=790 [--json] [--xla_flags='--xla_gpu_...']

Builds exactly what training builds (``run.setup`` with a synthetic ``DatasetInfo``, the state
created over the mesh with the configured parameter placement, ``run.jit_train_step``) and times it with ``benchmarks/measure.py``: compile time, median
step time, images/s, TFLOP/s from XLA's cost analysis, and the fraction of ``--peak_tflops``.
Never imports TensorFlow, so it runs where only JAX is installed (ml_collections is needed for the
config; see benchmarks/gpu_run.sh).

The synthetic images have the shape the config's training pipeline produces: the ``size=`` of the
last sizing op in ``config.data.train_preprocess`` (e.g. ``random_resized_crop(size=224)``), else
the dataset's native size; override with ``--image_size / --channels / --num_classes``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run as a script from anywhere: the project and configs/ import
  sys.path.insert(0, _REPO)

import jax  # noqa: E402  (importing jax starts no backend: --xla_flags still applies)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import measure  # noqa: E402
from imgcls_jax import run as run_lib  # noqa: E402
from imgcls_jax import sharding  # noqa: E402
from imgcls_jax import state as state_lib  # noqa: E402
from imgcls_jax.data import arrays  # noqa: E402
from imgcls_jax.data.info import DatasetInfo  # noqa: E402
from imgcls_jax.errors import UserError  # noqa: E402

# Native (size, channels, classes) of datasets, for synthetic data without tfds.
NATIVE_SHAPES: dict[str, tuple[int, int, int]] = {
    'sklearn_digits': (8, 1, 10),
    'mnist': (28, 1, 10),
    'fashion_mnist': (28, 1, 10),
    'kmnist': (28, 1, 10),
    'cifar10': (32, 3, 10),
    'cifar100': (32, 3, 100),
    'svhn_cropped': (32, 3, 10),
    'imagenet2012': (224, 3, 1000),
    'imagenette': (224, 3, 10),
}
# Ops whose output is size x size (imgcls_jax/data/pp/); pad_crop keeps the input size.
_SIZING_OPS = ('random_resized_crop', 'resize', 'center_crop')

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', flag_values=FLAGS,
                                lock_config=True)
flags.DEFINE_integer('image_size', 0, 'Synthetic image side; 0 = from the config.',
                     flag_values=FLAGS)
flags.DEFINE_integer('channels', 0, 'Image channels; 0 = from the dataset name.', flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 0, 'Classes; 0 = from the dataset name.', flag_values=FLAGS)
measure.define_flags(FLAGS)


@dataclasses.dataclass(frozen=True)
class Shape:
  """The synthetic batch: ``image_size x image_size x channels`` uint8, ``num_classes`` labels."""
  image_size: int
  channels: int
  num_classes: int


def synthetic_shape(config: ml_collections.ConfigDict, image_size: int = 0, channels: int = 0,
                    num_classes: int = 0) -> Shape:
  """The image / label shape training on ``config`` would see (arguments > 0 override)."""
  native = NATIVE_SHAPES.get(arrays.tfds_name(config.data) or config.data.name)  # arrays:NAME
  if native is None and not (channels and num_classes and image_size):
    raise UserError(f"No synthetic shape is known for dataset '{config.data.name}'; pass "
                    '--image_size, --channels and --num_classes.')
  size = 0
  for op in str(config.data.train_preprocess).split('|'):
    name = op.split('(')[0].strip()
    m = re.search(r'\bsize\s*=\s*(\d+)', op)
    if name in _SIZING_OPS:
      size = int(m.group(1)) if m else 224  # the ops' default size
  native = native or (0, 0, 0)
  return Shape(image_size=image_size or size or native[0], channels=channels or native[1],
               num_classes=num_classes or native[2])


@dataclasses.dataclass
class Bench:
  """The project's train step jitted as training jits it, and what its arguments are made of."""
  jitted: Any
  mesh: jax.sharding.Mesh
  model_fn: state_lib.ModelFn
  tx: Any
  seed: int
  batch_size: int
  shape: Shape
  placement: sharding.ParamSharding
  ema: bool   # config.ema.decay > 0: the state carries the averaged copy, as in training


def build(config: ml_collections.ConfigDict, shape: Shape) -> Bench:
  """Mesh, optimizer, model and the jitted, state-donating train step (nothing allocated yet):
  ``run.setup`` and ``run.jit_train_step``, exactly as training builds them."""
  info = DatasetInfo(name=config.data.name, num_classes=shape.num_classes,
                     class_names=tuple(str(i) for i in range(shape.num_classes)),
                     image_shape=(shape.image_size, shape.image_size, shape.channels),
                     num_examples={})
  # The schedule's length changes a scalar, not the step's cost: 100 steps per epoch stand in.
  s = run_lib.setup(config, info, steps_per_epoch=100)
  ema = s.step_cfg.ema_decay > 0
  _, state_sh = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh, s.placement,
                                         ema=ema)
  return Bench(jitted=run_lib.jit_train_step(s, state_sh), mesh=s.mesh, model_fn=s.model_fn,
               tx=s.tx, seed=config.seed, batch_size=config.batch_size, shape=shape,
               placement=s.placement, ema=ema)


def batch_spec(bench: Bench) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of a training batch (uint8 images, int32 labels)."""
  sh = sharding.batch_sharding(bench.mesh)
  s = bench.shape
  return {'image': jax.ShapeDtypeStruct((bench.batch_size, s.image_size, s.image_size, s.channels),
                                        jnp.uint8, sharding=sh),
          'label': jax.ShapeDtypeStruct((bench.batch_size,), jnp.int32, sharding=sh)}


def synthetic_batch(bench: Bench) -> dict[str, jax.Array]:
  """Random images and labels generated on the devices, already split over the batch axis."""
  spec = batch_spec(bench)

  def make():
    k1, k2 = jax.random.split(jax.random.key(bench.seed))
    images = jax.random.randint(k1, spec['image'].shape, 0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(k2, spec['label'].shape, 0, bench.shape.num_classes, jnp.int32)
    return {'image': images, 'label': labels}
  return jax.jit(make, out_shardings=sharding.batch_sharding(bench.mesh))()


def flops_per_step(bench: Bench) -> float | None:
  """XLA's FLOP count of one step, from shapes alone (no state allocated, nothing compiled)."""
  abstract, _ = state_lib.abstract_state(bench.model_fn, bench.tx, bench.seed, bench.mesh,
                                         bench.placement, ema=bench.ema)
  return measure.flops(bench.jitted.lower(abstract, batch_spec(bench)), None)['flops_per_step']


def run(config: ml_collections.ConfigDict, shape: Shape, *, num_steps: int, warmup: int,
        window: int, peak_tflops: float, config_path: str = '',
        guard: str = 'disallow', profile_dir: str = '',
        profile_steps: int = 5) -> dict[str, Any]:
  """Compiles and times the step; returns the JSON record (see ``measure.result``)."""
  bench = build(config, shape)
  state, _ = state_lib.create(bench.model_fn, bench.tx, bench.seed, bench.mesh, bench.placement,
                              ema=bench.ema)
  batch = synthetic_batch(bench)
  params = state_lib.param_count(state.params)
  compiled, info = measure.compile_step(bench.jitted, state, batch)
  state, times, metrics = measure.time_steps(compiled, state, batch, warmup=warmup,
                                             steps=num_steps, window=window, guard=guard)
  if profile_dir:
    state = measure.profile_steps(compiled, state, batch, profile_dir, profile_steps)
  extra = {'config': config_path, 'model': config.model.name, 'dtype': config.dtype,
           'image_size': shape.image_size, 'channels': shape.channels,
           'num_classes': shape.num_classes, 'params': params, 'window': window,
           'warmup': warmup, 'mesh_devices': int(bench.mesh.devices.size)}
  return measure.result('imgcls_jax', batch_size=config.batch_size, step_times=times,
                        compile_info=info, peak_tflops=peak_tflops,
                        losses=[float(m['loss']) for m in metrics], extra=extra)


def main(argv: list[str]) -> None:
  """Parses flags, runs the benchmark, prints the record."""
  measure.parse_flags(FLAGS, argv)
  config = FLAGS.config
  if config is None:
    measure.fail('pass --config=configs/<name>.py')
  try:
    sharding.request_cpu_devices(int(config.mesh.get('cpu_devices', 0)))
    shape = synthetic_shape(config, FLAGS.image_size, FLAGS.channels, FLAGS.num_classes)
    record = run(config, shape, num_steps=FLAGS.steps, warmup=FLAGS.warmup, window=FLAGS.window,
                 peak_tflops=FLAGS.peak_tflops, config_path=FLAGS['config'].config_filename,
                 guard=FLAGS.transfer_guard, profile_dir=FLAGS.profile_dir,
                 profile_steps=FLAGS.profile_steps)
  except (UserError, ValueError) as e:
    measure.fail(str(e))
  measure.emit(record, FLAGS.json)


if __name__ == '__main__':
  main(sys.argv)
