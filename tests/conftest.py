"""Shared test set-up.

In-process tests see 8 fake CPU devices (so every in-process run is sharded over a real Mesh, and a
test can compare a 1-device mesh with an 8-device one via config.mesh.num_devices). Global batch
sizes in tests must therefore be multiples of 8 (or set config.mesh.num_devices).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()


def _session_dir(var: str, prefix: str) -> bool:
  """Points ``var`` at a fresh temporary directory unless it is set already, and removes that
  directory when the process that made it exits; True when it made one.

  xdist workers and child processes inherit ``var`` from the process that started them, so they
  make no directory and never remove the session's while others still use it; a forked child
  inherits the exit handler, hence the process-id check.
  """
  if var in os.environ:
    return False
  import atexit
  import shutil
  import tempfile
  path, owner = tempfile.mkdtemp(prefix=prefix), os.getpid()

  def remove() -> None:
    if os.getpid() == owner:
      shutil.rmtree(path, ignore_errors=True)
  atexit.register(remove)
  os.environ[var] = path
  return True


# One persistent compilation cache for the whole session (every xdist worker and every child
# process inherits these variables): the suite compiles the same programs again and again (the
# digits CNN in many tests and CLI children); the second compile of a program is a cache load,
# which gives the same executable, so the same bits. A fresh directory per session, so every
# program is still compiled for real once per run; the process that made it deletes it. The size
# limit only turns on JAX's file lock (two workers may compile one program at once).
# config.compilation_cache_dir (main.py) still points a child at its own cache when a test sets it.
if _session_dir('JAX_COMPILATION_CACHE_DIR', 'imgcls_jax_test_jax_cache_'):
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(16 << 30)

# Image-folder indexes are cached per folder (imgcls_jax/data/folder_index.py); keep the tests'
# out of the user's ~/.cache (children inherit it), in a directory removed with the session.
_session_dir('IMGCLS_JAX_CACHE_DIR', 'imgcls_jax_cache_')

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FAKE_DEVICES = 8


@pytest.fixture(autouse=True)
def _root_logging_restored():
  """Puts the root logger back after each test. ``main.run`` in-process sets a handler on the
  test's captured stderr, which closes with the test: a later test's log line (a server thread's)
  would print a 'Logging error' into that test's own captured stderr."""
  import logging
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  yield
  root.handlers[:] = handlers
  root.setLevel(level)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  """A session-wide tfds data_dir (the digits builder prepares itself there on first use)."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def digits_config(tfds_dir):
  """The default config read through tfds, shrunk for tests (``small_digits_config``)."""
  return small_digits_config(tfds_dir)


def small_digits_config(tfds_dir: str):
  """The default config with the digits read through tfds and tf.data (``default.tfds_digits``:
  the tf.data path in-process tests exercise), shrunk for tests: a narrow CNN, few steps, no
  progress bar, no evaluations or checkpoints before the end (for fixtures of any scope)."""
  sys.path.insert(0, REPO)
  from configs import default
  c = default.tfds_digits(default.get_config())   # tf.data (CLI children run the default arrays)
  c.data.data_dir = tfds_dir
  c.model.widths = (16, 32)
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_train_steps = 40
  c.log_every_steps = 10
  c.eval_every_steps = -1
  c.eval_every_epochs = -1.0
  c.checkpoint_every_epochs = -1.0
  c.checkpoint_every_steps = -1
  c.progress_bar = False
  c.tensorboard = False
  return c


def checkpointed_digits_run(tmp_path_factory, tfds_dir: str, steps: int, every: int = 10):
  """(its config, its workdir): a narrow digits CNN trained ``steps`` steps, a checkpoint every
  ``every`` (module fixtures of the tests that damage or read checkpoints build on it)."""
  import copy
  from imgcls_jax import train
  c = small_digits_config(tfds_dir)
  c.model.widths = (8, 16)
  c.num_train_steps = steps
  c.checkpoint_every_steps = every
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  train.train_and_evaluate(copy.deepcopy(c), workdir)
  return c, workdir


def copy_of_run(run: tuple, tmp_path) -> tuple:
  """(a copy of its config, a copy of its workdir) of a ``checkpointed_digits_run``, for a test
  that damages or resumes it."""
  import copy
  import shutil
  c, original = run
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  return copy.deepcopy(c), workdir


@pytest.fixture
def browser():
  """Headless Chromium driven by selenium (the web page tests; they skip without Chromium)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = os.environ.get('CHROMIUM_BINARY', '/usr/bin/chromium')
  for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
               '--window-size=1200,900'):
    opts.add_argument(flag)
  driver = webdriver.Chrome(
      service=Service(os.environ.get('CHROMEDRIVER', '/usr/bin/chromedriver')), options=opts)
  yield driver
  driver.quit()


def subprocess_env(num_devices: int | None = None) -> dict[str, str]:
  """Environment for a child ``python -m imgcls_jax.main`` (fake device count when given)."""
  env = dict(os.environ)
  flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device_count'))
  if num_devices:
    flags += f' --xla_force_host_platform_device_count={num_devices}'
  env['XLA_FLAGS'] = flags.strip()
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


# Child-process code after which tensorflow / tensorflow_datasets look not installed, as on the
# GPU image: importing them raises ModuleNotFoundError and importlib.util.find_spec gives None
# (libraries such as etils probe for TF that way). Prepend it to a child's own code, or use
# run_without_tf.
BLOCK_TF = '''
import sys
class _NotInstalled:
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      return None
    return self.finder.find_spec(name, path, target)
  def __getattr__(self, attr):
    return getattr(self.finder, attr)
sys.meta_path[:] = [_NotInstalled(f) for f in sys.meta_path]
'''

_WITHOUT_TF = BLOCK_TF + '''
import runpy
sys.argv = sys.argv[1:]
if sys.argv[0] == '--import':
  __import__(sys.argv[1])
elif sys.argv[0] == '-m':
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
  runpy.run_path(sys.argv[0], run_name='__main__')
'''


def run_without_tf(*args: str, timeout: int = 300, num_devices: int = 1
                   ) -> subprocess.CompletedProcess:
  """``python SCRIPT ARGS`` / ``python -m MODULE ARGS`` / ``--import MODULE`` in a child process
  where TensorFlow cannot be imported."""
  return subprocess.run([sys.executable, '-c', _WITHOUT_TF, *args], cwd=REPO,
                        env=subprocess_env(num_devices), capture_output=True, text=True,
                        timeout=timeout)


# Runs each argv of the JSON list sys.argv[2] through main.run, one after the other in this one
# process, each with its own stdout and stderr; writes [[status, stdout, stderr], ...] to
# sys.argv[1] (an exception is printed into that call's stderr, status 1).
_RUN_EACH = '''
import contextlib, io, json, sys
from imgcls_jax import main
results = []
for argv in json.loads(sys.argv[2]):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = main.run(['imgcls_jax.main', *argv])
    except BaseException:
      import traceback
      traceback.print_exc()
      status = 1
  results.append([status, out.getvalue(), err.getvalue()])
with open(sys.argv[1], 'w') as f:
  json.dump(results, f)
'''


def main_run_each(argvs: list[list[str]], tmp_dir, env: dict[str, str] | None = None,
                  timeout: int = 600) -> list:
  """For each of ``argvs``: (returncode, stdout, stderr) of ``python -m imgcls_jax.main ARGV``
  (``main.run``), run one after the other in one child process (it imports once: ~2-4 s a child
  otherwise), whose own stderr must hold no error line or traceback. ``env``: the child's
  environment (default ``subprocess_env(1)``)."""
  import json
  import types
  out = os.path.join(str(tmp_dir), 'main_run_each.json')
  proc = subprocess.run([sys.executable, '-c', _RUN_EACH, out, json.dumps(argvs)], cwd=REPO,
                        env=env or subprocess_env(1), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not [l for l in proc.stderr.splitlines() if l.startswith('error:') or 'Traceback' in l], \
      proc.stderr[-3000:]
  with open(out) as f:
    return [types.SimpleNamespace(returncode=status, stdout=stdout, stderr=stderr)
            for status, stdout, stderr in json.load(f)]


def main_run_here(monkeypatch, capsys, *args: str):
  """(returncode, stdout, stderr) of the command line ``python -m imgcls_jax.main ARGS`` run in
  this process through its entry point ``main.run``, from the repository root: for a test that
  only checks what the command says or writes (a child process paid ~3-8 s of imports). The tests
  that prove a mode needs nothing but its run directory still run children."""
  import types
  from imgcls_jax import main
  monkeypatch.chdir(REPO)
  capsys.readouterr()
  status = main.run(['imgcls_jax.main', *args])
  said = capsys.readouterr()
  return types.SimpleNamespace(returncode=status, stdout=said.out, stderr=said.err)


def pytest_report_header(config):
  return f'jax {jax.__version__}; fake CPU devices for in-process tests: {NUM_FAKE_DEVICES}'


@pytest.fixture(scope='session')
def fmnist_dir(tmp_path_factory) -> str:
  """A tfds data_dir holding Fashion-MNIST, prepared by the documented command (in a child
  process) once per test session: xdist workers share it (the first one prepares it under a file
  lock, the others wait and read it). Tests only read it, except that the configs reading
  ``arrays:fashion_mnist`` write ``arrays/fashion_mnist.npz`` into it on first use (each writer
  replaces the file whole, so workers racing to write it are safe)."""
  import fcntl
  import subprocess
  from imgcls_jax.data import prepare_fashion_mnist
  if not all(os.path.isfile(os.path.join(prepare_fashion_mnist.DEBIAN_DIR, f))
             for f in prepare_fashion_mnist.FILES):
    pytest.skip('apt-get install -y dataset-fashion-mnist (.ci/run does)')
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # this session's directory, shared by its workers
  data_dir = str(base / 'fmnist_tfds_shared')
  with open(str(base / 'fmnist_tfds_shared.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not os.path.isfile(data_dir + '.done'):
        out = subprocess.run([sys.executable, '-m', 'imgcls_jax.data.prepare_fashion_mnist',
                              f'--data_dir={data_dir}'], capture_output=True, text=True,
                             env=subprocess_env(), cwd=REPO, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert 'fashion_mnist is prepared in' in out.stdout
        open(data_dir + '.done', 'w').close()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return data_dir


@contextlib.contextmanager
def local_service(clf, config):
  """``serve``'s HTTP server for ``clf`` on a free loopback port; yields ``call(method, path,
  body=None, headers=None) -> (status, parsed JSON)``."""
  import http.client
  import json
  from imgcls_jax import serve
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  srv = serve.make_server(clf, cfg).start()
  host, port = srv.url.split('//')[1].rsplit(':', 1)
  conn = http.client.HTTPConnection(host, int(port), timeout=30)

  def call(method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())

  try:
    yield call
  finally:
    conn.close()
    srv.close()


def export_description(config, workdir: str, out_dir: str) -> dict:
  """``export.json`` of a SavedModel-only export of ``workdir`` into ``out_dir``."""
  import json
  from imgcls_jax import export
  cfg = config.copy_and_resolve_references()
  cfg.export.output_dir = out_dir
  cfg.export.tflite = False
  cfg.export.verify_examples = 16
  export.export(cfg, workdir)
  with open(os.path.join(out_dir, 'export.json')) as f:
    return json.load(f)


def with_grid(config, grid, seeds=1, **sweep_keys):
  """A copy of ``config`` that sweeps ``grid`` over ``seeds`` seeds (``config.sweep`` keys too)."""
  import copy
  c = copy.deepcopy(config)
  c.sweep.grid = grid
  c.sweep.seeds = seeds
  for k, v in sweep_keys.items():
    c.sweep[k] = v
  return c
