"""Images/s of the ImageNet-style training input pipeline, in total and per core.

  python benchmarks/input_pipeline.py [--num_images=512] [--threads=0] [--seconds=20] [--json]

Writes ``--num_images`` JPEGs at ImageNet-like sizes (about 500x375, quality 90, textured content;
kept in ``--image_dir`` when given, else a temporary directory) as an image folder of 10 classes,
then times the project's real training stream over it (``pipeline.train_dataset`` with
``random_resized_crop(size=224)|flip_lr``: JPEG decode, crop, resize, flip; batches of uint8). The
normalisation to float happens on the accelerator in this project (``steps.normalize``); the
second line adds it on the host (uint8 -> float32, mean/std), as pipelines that normalise on the
host do. Decoding is never cached: every epoch decodes every file again, as with ImageNet.

Reports images/s, the cores tf.data may use (``--threads``, default: the CPUs this process may run
on) and images/s per core, plus images per CPU-second of the process (the honest per-core figure
on a shared machine, where wall-clock rates depend on the neighbours).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_NUM = flags.DEFINE_integer('num_images', 512, 'JPEGs to generate (10 classes).')
_DIR = flags.DEFINE_string('image_dir', None, 'Where to write them (default: a temporary dir).')
_THREADS = flags.DEFINE_integer('threads', 0, 'tf.data threads (0: the CPUs this process may use).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Images per batch.')
_SECONDS = flags.DEFINE_float('seconds', 20.0, 'Timed seconds per measurement (after warm-up).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON record per measurement instead of text.')

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500))


def write_jpegs(root: str, num_images: int, seed: int = 0) -> int:
  """``num_images`` textured JPEGs in ``root/train/class_<k>/``; returns their total bytes."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  total = 0
  for i in range(num_images):
    w, h = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
    # Smooth colour fields plus fine noise: JPEG sizes like photographs (~100-150 KB).
    low = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC),
                       np.float32)
    pixels = np.clip(field + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    path = os.path.join(root, 'train', f'class_{i % 10}', f'{i:06d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    total += os.path.getsize(path)
  return total


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def measure(root: str, *, threads: int, batch_size: int, seconds: float,
            host_normalize: bool) -> dict:
  """Times the training stream over the image folder at ``root``."""
  from configs import default
  from imgcls_jax.data import pipeline
  from imgcls_jax.data.tf_import import tf
  c = default.get_config()
  c.data.name = 'image_folder'
  c.data.folder = root
  c.data.train_preprocess = 'random_resized_crop(size=224)|flip_lr'
  c.data.eval_split = 'train'
  c.data.cache = False
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  ds, _ = pipeline.train_dataset(c.data, seed=0, local_batch_size=batch_size)
  if host_normalize:
    mean = tf.constant(c.data.mean) * 255.0
    std = tf.constant(c.data.std) * 255.0
    ds = ds.map(lambda b: {'image': (tf.cast(b['image'], tf.float32) - mean) / std,
                           'label': b['label']}, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  ds = ds.with_options(options)
  it = iter(ds)
  for _ in range(3):  # warm-up: thread pools, autotuning, file cache
    next(it)
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    n += int(batch['label'].shape[0])
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {'name': 'input_pipeline', 'ops': c.data.train_preprocess,
          'host_normalize': host_normalize, 'images': n, 'seconds': wall,
          'images_per_sec': n / wall, 'cores': threads,
          'images_per_sec_per_core': n / wall / threads,
          'cpu_seconds': cpu, 'images_per_cpu_second': n / max(cpu, 1e-9),
          'batch_size': batch_size, 'image_sizes': 'about 500x375 JPEG, quality 90'}


def main(argv: list[str]) -> None:
  del argv
  threads = _THREADS.value or _cores()
  with tempfile.TemporaryDirectory() as tmp:
    root = _DIR.value or tmp
    if not os.path.isdir(os.path.join(root, 'train')):
      size = write_jpegs(root, _NUM.value)
      if not _JSON.value:
        print(f'Wrote {_NUM.value} JPEGs ({size / _NUM.value / 1024:.0f} KB each on average) '
              f'to {root}.', flush=True)
    for host_normalize in (False, True):
      r = measure(root, threads=threads, batch_size=_BATCH.value, seconds=_SECONDS.value,
                  host_normalize=host_normalize)
      if _JSON.value:
        print(json.dumps(r), flush=True)
      else:
        what = ('decode + random_resized_crop(224) + flip' +
                (' + normalize on the host' if host_normalize else ' (normalize on the device)'))
        print(f'{what}: {r["images_per_sec"]:.0f} images/s on {threads} core(s) = '
              f'{r["images_per_sec_per_core"]:.0f} images/s per core; '
              f'{r["images_per_cpu_second"]:.0f} images per CPU-second of this process.',
              flush=True)


if __name__ == '__main__':
  app.run(main)
