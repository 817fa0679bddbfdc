"""Throughput harness: runs on CPU in CI-sized settings without TensorFlow; counts FLOPs right.

Smoke tests, not timed tests: they assert the records are complete and consistent, never a speed.
"""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_without_tf, subprocess_env

_run_without_tf = run_without_tf


def _check_record(r: dict, *, name: str, batch_size: int, image_size: int, timed_steps: int):
  assert r['name'] == name
  assert (r['batch_size'], r['image_size'], r['timed_steps']) == (batch_size, image_size,
                                                                  timed_steps)
  assert r['platform'] == 'cpu' and r['num_devices'] == 1
  assert r['compile_s'] > 0 and r['lower_s'] > 0
  assert 0 < r['step_time_min_s'] <= r['step_time_median_s'] <= r['step_time_max_s']
  assert math.isclose(r['images_per_sec'], batch_size / r['step_time_median_s'], rel_tol=1e-9)
  assert r['flops_per_step'] > 0
  assert math.isclose(r['gflops_per_image'], r['flops_per_step'] / batch_size / 1e9, rel_tol=1e-9)
  assert math.isclose(r['tflops_per_sec'], r['flops_per_step'] / r['step_time_median_s'] / 1e12,
                      rel_tol=1e-9)
  assert r['loss_finite'] and r['loss_first'] > 0


def test_throughput_runs_on_cpu_without_tensorflow(tmp_path):
  proc = _run_without_tf('benchmarks/throughput.py', '--config=configs/default.py',
                         '--config.batch_size=16', '--config.model.widths=(8, 16)', '--steps=4',
                         '--window=2', '--warmup=1', '--peak_tflops=2.5', '--json',
                         f'--profile_dir={tmp_path}', '--profile_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  _check_record(r, name='imgcls_jax', batch_size=16, image_size=8, timed_steps=4)
  assert (r['model'], r['channels'], r['num_classes'], r['dtype']) == ('cnn', 1, 10, 'float32')
  assert r['peak_tflops'] == 2.5
  assert math.isclose(r['peak_fraction'], r['tflops_per_sec'] / 2.5, rel_tol=1e-9)
  assert r['config'].endswith('configs/default.py')
  assert 'images/s' in proc.stderr  # the readable summary goes to stderr with --json
  # --profile_dir traced two more steps; the summary finds the XLA thunks that ran them.
  from benchmarks import trace_summary
  summary = subprocess.run([sys.executable, 'benchmarks/trace_summary.py', str(tmp_path),
                            '--steps=2', '--json'], cwd=REPO, capture_output=True, text=True)
  assert summary.returncode == 0, summary.stderr
  t = json.loads(summary.stdout)
  assert t['source'] == 'host XLA threads' and t['device_ms_per_step'] > 0 and t['top']
  assert math.isclose(sum(k['share'] for k in t['kinds']), 1.0, rel_tol=1e-9)
  assert not any(k['name'].startswith('ThunkExecutor') for k in t['top'])
  with pytest.raises(FileNotFoundError, match='--profile_dir='):
    trace_summary.newest_trace(str(tmp_path / 'nothing'))


def test_trace_summary_sums_device_kernels_per_step_and_kind():
  from benchmarks import trace_summary
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 7, 'args': {'name': 'tf_XLAEigen/1'}}]
  kernels = [('sm90_xmma_fprop_implicit_gemm_bf16', 300.0), ('input_reduce_fusion_3', 50.0),
             ('loop_add_fusion', 25.0), ('nvjet_hsh_128x256', 100.0),
             ('sm90_xmma_fprop_implicit_gemm_bf16', 100.0), ('loop_add_fusion', 25.0)]
  events = meta + [{'ph': 'X', 'pid': 1, 'tid': 3, 'ts': i, 'dur': d, 'name': n}
                   for i, (n, d) in enumerate(kernels)]
  events.append({'ph': 'X', 'pid': 2, 'tid': 7, 'ts': 0, 'dur': 1e6, 'name': 'host_only'})
  s = trace_summary.summarise({'traceEvents': events}, steps=2, top=2)
  assert s['source'] == '/device:GPU:0' and s['kernels'] == 4
  assert math.isclose(s['device_ms_per_step'], 600 / 2 / 1e3)  # host events are not counted
  kinds = {k['kind']: k['ms_per_step'] for k in s['kinds']}
  assert kinds == pytest.approx({'convolution': 0.2, 'matmul': 0.05, 'reduction fusion': 0.025,
                                 'other fusion': 0.025})
  assert [t['name'] for t in s['top']] == ['sm90_xmma_fprop_implicit_gemm_bf16',
                                           'nvjet_hsh_128x256']
  assert s['top'][0]['calls_per_step'] == 1.0 and math.isclose(s['top'][0]['share'], 400 / 600)


def test_throughput_builds_the_ema_copy_an_ema_config_trains_with():
  """A config with weight EMA (fashion_mnist_quick's) steps the averaged copy too: the benchmark's
  state must carry it, as training's does (it failed with a TypeError before)."""
  from benchmarks import throughput
  from configs import default
  c = default.get_config()
  c.batch_size, c.model.widths, c.ema.decay = 8, (8,), 0.9
  r = throughput.run(c, throughput.Shape(8, 1, 10), num_steps=2, warmup=1, window=1,
                     peak_tflops=1.0)
  assert r['loss_finite'] and r['step_time_median_s'] > 0


def test_reference_runs_on_cpu_without_tensorflow():
  proc = _run_without_tf('benchmarks/reference_flax.py', '--batch_size=4', '--image_size=16',
                         '--num_classes=10', '--stage_sizes=1', '--dtype=float32', '--steps=2',
                         '--window=1', '--warmup=1', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  _check_record(r, name='flax_reference', batch_size=4, image_size=16, timed_steps=2)
  assert r['peak_fraction'] is None  # no --peak_tflops given


def test_tensorflow_blocker_is_effective():
  """The control for the tests above: the tf.data pipeline does import TF, and the blocker stops
  it (training itself no longer imports TF: arrays files train without it)."""
  proc = _run_without_tf('--import', 'imgcls_jax.data.pipeline')
  assert proc.returncode != 0
  assert "ModuleNotFoundError: No module named 'tensorflow'" in proc.stderr


@pytest.mark.parametrize('args,message', [
    (['--config.no_such_key=1'], 'error: a --config.KEY=VALUE override names a key'),
    (['--steps=5', '--window=2'], 'error: --steps (5) must be a positive multiple of --window'),
    (['--no_such_flag'], 'error: bad flag: Unknown command line flag'),
])
def test_bad_flags_end_in_one_line(args, message, capsys):
  from benchmarks import throughput
  try:
    with pytest.raises(SystemExit) as exit_info:
      throughput.main(['throughput.py', '--config=configs/default.py', *args])
  finally:
    throughput.FLAGS.unparse_flags()
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(message), err


def test_synthetic_shape_follows_the_config():
  from benchmarks import throughput
  from configs import default, imagenet_resnet50
  from imgcls_jax.errors import UserError
  imagenet = imagenet_resnet50.get_config()
  assert throughput.synthetic_shape(imagenet) == throughput.Shape(224, 3, 1000)
  assert throughput.synthetic_shape(default.get_config()) == throughput.Shape(8, 1, 10)
  c = default.get_config()
  c.data.name = 'fashion_mnist'
  c.data.train_preprocess = 'pad_crop(pad=2)|flip_lr'
  assert throughput.synthetic_shape(c) == throughput.Shape(28, 1, 10)
  c.data.train_preprocess = 'resize(size=40)|random_resized_crop(size=32)'
  assert throughput.synthetic_shape(c) == throughput.Shape(32, 1, 10)
  assert throughput.synthetic_shape(c, image_size=20, num_classes=7) == throughput.Shape(20, 1, 7)
  c.data.name = 'my_folder_dataset'
  with pytest.raises(UserError, match='--image_size, --channels and --num_classes'):
    throughput.synthetic_shape(c)
  assert throughput.synthetic_shape(c, 64, 3, 5) == throughput.Shape(64, 3, 5)


def test_resnet50_flops_match_the_published_cost_and_the_reference():
  """~24.6 GFLOP per 224 px image (3 x 8.2 GFLOP forward); both steps count the same model."""
  import functools

  import jax
  import jax.numpy as jnp

  from benchmarks import measure, reference_flax, throughput
  from configs import imagenet_resnet50
  c = imagenet_resnet50.get_config()
  c.batch_size = 8
  project = throughput.flops_per_step(throughput.build(c, throughput.synthetic_shape(c))) / 8e9
  assert 23.0 < project < 25.5, project

  model = reference_flax.ResNet(stage_sizes=(3, 4, 6, 3), num_classes=1000)
  sched = reference_flax.lr_schedule()
  state = jax.eval_shape(lambda: reference_flax.create_state(model, 224, sched))
  batch = {'image': jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.bfloat16),
           'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
  step = jax.jit(functools.partial(reference_flax.train_step, num_classes=1000, schedule=sched))
  reference = measure.flops(step.lower(state, batch), None)['flops_per_step'] / 8e9
  assert abs(project - reference) / reference < 0.03, (project, reference)


def test_flops_are_counted_on_the_cpu_when_the_accelerator_cannot_analyse_a_lowered_module():
  """A GPU plugin raises NotImplementedError for ``Lowered.cost_analysis`` (jax, PJRT C API): the
  host's CPU client then counts the same module, here a matmul split over the 8 fake devices,
  against the hand count 2 * M * K * N (+ the tanh and the sum)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from benchmarks import measure
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('data',))
  rows = NamedSharding(mesh, PartitionSpec('data'))
  step = jax.jit(lambda a, b: jnp.tanh(a @ b).sum(), in_shardings=(rows, None))
  lowered = step.lower(jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=rows),
                       jax.ShapeDtypeStruct((128, 32), jnp.float32))

  class PluginLowered:  # what an accelerator plugin's Lowered does
    def cost_analysis(self):
      raise NotImplementedError('Lowered.cost_analysis not implemented on platform gpu')

    def compiler_ir(self, dialect):
      return lowered.compiler_ir(dialect)

  direct = measure.flops(lowered, None)['flops_per_step']
  fallback = measure.flops(PluginLowered(), None)['flops_per_step']
  matmul = 2 * 64 * 128 * 32
  assert fallback == direct
  assert matmul <= fallback <= matmul + 2 * 64 * 32, fallback

  class Nothing:  # neither the plugin nor a module to count: no figure, not a crash
    def cost_analysis(self):
      raise NotImplementedError

    def compiler_ir(self, dialect):
      raise ValueError('no module')
  assert measure.flops(Nothing(), None)['flops_per_step'] is None


def test_time_steps_counts_windows_and_rejects_uneven_ones():
  import jax.numpy as jnp

  from benchmarks import measure
  calls = []

  def step(state, batch):
    calls.append(1)
    return state + batch, {'loss': state}
  state, times, metrics = measure.time_steps(step, jnp.float32(0), jnp.float32(1), warmup=2,
                                             steps=6, window=3)
  assert len(calls) == 8 and float(state) == 8.0
  assert len(times) == 2 and [float(m['loss']) for m in metrics] == [4.0, 7.0]
  with pytest.raises(ValueError, match='positive multiple'):
    measure.time_steps(step, state, 1.0, warmup=0, steps=5, window=2)


def test_time_steps_fails_a_step_fed_from_the_host():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import measure
  step = jax.jit(lambda state, batch: (state + batch.sum(), {'loss': state}))
  measure.time_steps(step, jnp.float32(0), jnp.ones(3), warmup=1, steps=2, window=1)
  with pytest.raises(Exception, match='Disallowed host-to-device transfer'):
    measure.time_steps(step, jnp.float32(0), np.ones(3), warmup=1, steps=2, window=1)


def test_compare_table(tmp_path):
  from benchmarks import measure
  base = {'images_per_sec': 100.0, 'step_time_median_s': 0.5, 'tflops_per_sec': 1.0,
          'peak_fraction': 0.1, 'compile_s': 3.0, 'device_kind': 'cpu'}
  (tmp_path / 'a.json').write_text('readable line\n' + json.dumps(base))
  (tmp_path / 'b.json').write_text(json.dumps({**base, 'images_per_sec': 150.0}))
  table = measure.compare([str(tmp_path / n) for n in ('a.json', 'b.json', 'missing.json')])
  lines = table.splitlines()
  assert 'x1.000' in lines[0] and 'x1.500' in lines[1] and 'no result' in lines[2]


def test_latency_benchmark_smoke():
  """benchmarks/latency.py end to end on tiny settings: every (runtime, batch) cell timed, and the
  server load test answered every request."""
  proc = subprocess.run(
      [sys.executable, 'benchmarks/latency.py', '--models=digits_cnn', '--runtimes=jax',
       '--batches=1,3', '--seconds=0', '--min_iters=3', '--max_iters=3', '--clients=1,2',
       '--load_requests=8', '--load_max_batch=2', '--json'],
      cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['cpu'] and r['weights'] == 'random (seed 0)'
  assert [(c['runtime'], c['batch']) for c in r['latency']] == [('jax', 1), ('jax', 3)]
  for c in r['latency']:
    assert c['calls'] == 3 and 0 < c['p50_ms'] <= c['p99_ms'] and c['images_per_s'] > 0
  assert [(x['clients'], x['requests'], x['errors']) for x in r['load_test']] == [(1, 8, 0),
                                                                                  (2, 8, 0)]
  assert all(0 < x['p50_ms'] <= x['p99_ms'] and x['requests_per_s'] > 0 for x in r['load_test'])


def test_latency_without_tensorflow_names_the_runtimes_that_need_it():
  proc = _run_without_tf('benchmarks/latency.py', '--models=digits_cnn',
                         '--runtimes=jax,tflite,onnx', '--batches=1', '--seconds=0')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'latency.py: --runtimes tflite,onnx need TensorFlow (the exporter writes them through it), '
      'which is not installed here; pass --runtimes=jax, or install the project with pip install '
      '-e . where TensorFlow installs.')


@pytest.mark.parametrize('script', ['throughput.py', 'step_pairs.py'])
def test_help_prints_the_scripts_use_and_its_flags(script):
  proc = subprocess.run([sys.executable, f'benchmarks/{script}', '--help'], cwd=REPO,
                        env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(open(f'{REPO}/benchmarks/{script}').read().split('\n')[0][3:])
  assert '--config:' in proc.stdout and '--steps:' in proc.stdout


def test_throughput_of_the_speed_recipes_runs_without_tensorflow():
  """fashion_mnist_quick's step (derandomized flips laid out over epochs, patch whitening, EMA,
  2 CPU devices) builds without TensorFlow: the flip layout read ``read_shards`` from the tf.data
  pipeline module, so the run layer imported TensorFlow for such configs."""
  proc = _run_without_tf('benchmarks/throughput.py', '--config=configs/fashion_mnist_quick.py',
                         '--config.batch_size=16', '--config.model.widths=((8,), (16,))',
                         "--config.compilation_cache_dir=", '--steps=4', '--window=2',
                         '--warmup=1', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r['model'], r['mesh_devices'], r['timed_steps']) == ('fast_cnn', 2, 4)
  assert r['loss_finite'] and r['images_per_sec'] > 0


def test_throughput_of_a_tfds_named_config_runs_without_tensorflow():
  """A config that names a tfds dataset (as gpu_run.sh's ImageNet and WRN runs do) builds its
  step without TensorFlow: the check that its train and eval splits share no examples read the
  splits' sizes through the tfds reader."""
  proc = _run_without_tf('benchmarks/throughput.py', '--config=configs/cifar10_resnet18.py',
                         "--config.model={'name': 'resnet18', 'small_inputs': True, 'width': 4}",
                         '--config.batch_size=4', '--image_size=8', '--steps=2', '--window=1',
                         '--warmup=1', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (r['model'], r['image_size'], r['timed_steps']) == ('resnet18', 8, 2)
  assert r['loss_finite']


def test_step_pairs_times_variants_interleaved_without_tensorflow():
  proc = _run_without_tf('benchmarks/step_pairs.py', '--config=configs/default.py',
                         '--config.batch_size=16', '--config.model.widths=(8, 16)',
                         "--variant=", "--variant=batch_size=32; model.widths=(8, 32)",
                         '--rounds=2', '--steps=4', '--window=2', '--warmup=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
  assert len(rows) == 2 and rows[0][-1] == '(config)', proc.stdout
  assert ' '.join(rows[1]).endswith('batch_size=32; model.widths=(8, 32)'), proc.stdout
  ms = [float(r[0]) for r in rows]
  images_s = [float(r[r.index('images/s') - 1]) for r in rows]
  for m, ips, bs in zip(ms, images_s, (16, 32)):   # images/s is the variant's batch / its median
    assert math.isclose(1e3 * bs / ips, m, abs_tol=0.0051)   # ms is printed to 0.01
  assert rows[0][rows[0].index('images/s') + 1] == 'x1.000'


def test_step_pairs_rejects_unknown_keys_and_malformed_overrides():
  from benchmarks import step_pairs
  from configs import default
  from imgcls_jax.errors import UserError
  assert step_pairs.parse_overrides(" a.b = 1 ; c=((16,), (32,)); d=norms.0") == [
      ('a.b', 1), ('c', ((16,), (32,))), ('d', 'norms.0')]
  c = step_pairs.apply(default.get_config(), [('optim.freeze', 'convs.0')])
  assert c.optim.freeze == 'convs.0' and default.get_config().optim.freeze == ''
  with pytest.raises(UserError, match="variant key 'optim.frezze' is not in the config"):
    step_pairs.apply(default.get_config(), [('optim.frezze', 'x')])
  with pytest.raises(UserError, match="is not key=value"):
    step_pairs.parse_overrides('optim.freeze')


def test_startup_benchmark_times_its_cold_runs_without_any_compilation_cache(monkeypatch, capsys):
  """fashion_mnist_quick sets its own persistent cache ('default'): the cold runs (this checkout's
  and --before's) must switch it off, else they time a cache warmed by earlier runs."""
  from benchmarks import startup
  calls = []

  def fake(repo, config, extra):
    calls.append((repo, config, list(extra)))
    return 1.0, 2.0
  monkeypatch.setattr(startup, 'first_step_seconds', fake)
  assert startup.main(['startup.py', '--repeat=1', '--before=/tmp/old',
                       "--also=--config.data.name=arrays:x", 'configs/fashion_mnist_quick.py']) == 0
  flags = {}
  for repo, config, extra in calls:
    caches = [a.split('=', 1)[1] for a in extra if a.startswith('--config.compilation_cache_dir=')]
    assert len(caches) == 1, extra           # every run names its cache, '' for none
    flags.setdefault(caches[0] == '', []).append((repo, extra))
  assert {repo for repo, _ in flags[True]} == {'/tmp/old', startup._REPO}
  assert len(flags[True]) == 3               # before, now and --also, each cold once
  assert all(cache for cache in (e[-1].split('=', 1)[1] for _, e in flags[False]))
  assert 'also, no cache' in capsys.readouterr().out
