"""launch/ scripts: each dry run prints the exact commands, with the config passed through intact.

``launch/local.sh`` also really runs: here with a stand-in interpreter (how it stops its processes
and waits for them) and with two short training processes (a peer killed, a SIGTERM to the
script); in tests/test_multihost.py for a whole 2-process run.
"""
from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO, subprocess_env

# Arguments for imgcls_jax.main with spaces, parentheses and quotes: they must arrive unchanged.
MAIN_ARGS = ['--config=configs/default.py', '--workdir=/shared/runs/exp 1',
             '--config.model.widths=(16, 32)', "--config.data.data_dir=/data/it's here",
             '--config.optim.learning_rate=0.05']


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands as argv lists (comment lines skipped, a trailing '&' dropped)."""
  out = []
  for line in stdout.splitlines():
    if line.strip() and not line.startswith('#'):
      words = shlex.split(line)
      out.append(words[:-1] if words[-1] == '&' else words)
  return out


def _after_main(argv: list[str]) -> list[str]:
  return argv[argv.index('imgcls_jax.main') + 1:]


def test_local_dry_run_prints_one_command_per_process(tmp_path):
  r = _run('local.sh', '-n', '3', '--cpu-devices', '2', '--port', '12345', '--timeout', '600',
           '--python', sys.executable, '--dry-run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  cmds = _commands(r.stdout)
  assert cmds[-1] == ['wait'] and len(cmds) == 4
  for i, argv in enumerate(cmds[:3]):
    assert argv[:3] == ['env', 'JAX_PLATFORMS=cpu', argv[2]]
    assert argv[2].startswith('XLA_FLAGS=') and argv[2].endswith(
        '--xla_force_host_platform_device_count=2')
    assert argv[3:7] == ['timeout', '--signal=KILL', '600', sys.executable]
    assert _after_main(argv) == MAIN_ARGS + [
        '--config.mesh.cpu_devices=2',  # over a config file's value (main.py applies this one)
        '--config.distributed.enabled=True',
        '--config.distributed.coordinator_address=127.0.0.1:12345',
        '--config.distributed.num_processes=3', f'--config.distributed.process_id={i}']


def test_local_cpu_devices_refuses_a_different_config_mesh_cpu_devices():
  base = ['-n', '2', '--cpu-devices', '2', '--port', '1', '--python', sys.executable, '--dry-run',
          '--', '--config=configs/default.py', '--workdir=/tmp/w']
  for extra in (['--config.mesh.cpu_devices=1'], ['--config.mesh.cpu_devices', '3']):
    r = _run('local.sh', *base, *extra)
    assert r.returncode == 2 and r.stdout == '', r.stdout
    assert r.stderr.strip() == (f'local.sh: --cpu-devices 2 contradicts {" ".join(extra)}; give '
                                'one of them.')
  r = _run('local.sh', *base, '--config.mesh.cpu_devices=2')  # the same number: fine
  assert r.returncode == 0, r.stderr
  assert _after_main(_commands(r.stdout)[0])[2:4] == ['--config.mesh.cpu_devices=2'] * 2


def test_local_dry_run_gives_each_process_its_gpus_and_a_free_port():
  r = _run('local.sh', '-n', '2', '--gpus-per-process', '4', '--python', sys.executable,
           '--dry-run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert cmds[0][-1] == '--config.distributed.local_device_ids=0,1,2,3'
  assert cmds[1][-1] == '--config.distributed.local_device_ids=4,5,6,7'
  port = [a for a in cmds[0] if 'coordinator_address' in a][0].rsplit(':', 1)[1]
  assert port.isdigit() and 0 < int(port) < 65536  # picked by binding port 0
  assert cmds[0][0] == sys.executable and _after_main(cmds[0])[:len(MAIN_ARGS)] == MAIN_ARGS


@pytest.mark.parametrize('args, message', [
    (['-n', '0', '--', '--config=x'], "-n must be a positive integer"),
    (['--cpu-devices', '2', '--gpus-per-process', '1', '--', '--config=x'], 'not both'),
    (['--dry-run'], 'no arguments for imgcls_jax.main'),
])
def test_local_refuses_bad_arguments(args, message):
  r = _run('local.sh', *args)
  assert r.returncode == 2 and message in r.stderr


@pytest.mark.parametrize('script, args, option, example', [
    ('local.sh', ['-n'], '-n', '2'),
    ('local.sh', ['--num-processes'], '--num-processes', '2'),
    ('local.sh', ['--cpu-devices'], '--cpu-devices', '2'),
    ('local.sh', ['--gpus-per-process'], '--gpus-per-process', '4'),
    ('local.sh', ['--port', '--dry-run', '--', '--config=x'], '--port', '12345'),  # an option
    ('local.sh', ['--timeout', '', '--', '--config=x'], '--timeout', '3600'),       # empty
    ('local.sh', ['--grace'], '--grace', '90'),
    ('local.sh', ['--python', '--', '--config=x'], '--python', 'python3'),
    ('tpu_vm.sh', ['create', '--name'], '--name', 'exp1'),
    ('tpu_vm.sh', ['--zone'], '--zone', 'us-central2-b'),
    ('tpu_vm.sh', ['--zone=', 'create'], '--zone', 'us-central2-b'),
    ('tpu_vm.sh', ['--zone=z', '--project', '--dry-run', 'create'], '--project', 'my-project'),
    ('tpu_vm.sh', ['--zone=z', '--accelerator-type'], '--accelerator-type', 'v4-8'),
    ('tpu_vm.sh', ['--zone=z', '--version'], '--version', 'tpu-ubuntu2204-base'),
    ('tpu_vm.sh', ['--zone=z', '--worker'], '--worker', '0'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_an_option_without_its_value_is_named(script, args, option, example):
  """Not bash's own `line 46: 2: parameter null or not set` (status 1): the option, an example."""
  r = _run(script, *args)
  assert r.returncode == 2 and r.stdout == '', r.stdout
  assert r.stderr.strip() == f'{script}: {option} needs a value, e.g. {option} {example}.'


def test_local_refuses_an_unknown_option_before_main_args():
  """A typo of its own option (--cpu-device) reached main.py as an unknown flag; main.py's own
  flags may still come without the --."""
  base = ['--dry-run', '--port', '1', '--python', sys.executable]
  for unknown in ('--cpu-device', '-N', 'fast'):
    r = _run('local.sh', *base, unknown, '1', '--', '--config=configs/default.py')
    assert r.returncode == 2 and r.stdout == '', r.stdout
    kind = 'option' if unknown.startswith('-') else 'argument'
    assert r.stderr.strip() == (
        f"local.sh: unknown {kind} '{unknown}'; local.sh's options are -n, --cpu-devices, "
        '--gpus-per-process, --port, --timeout, --grace, --python and --dry-run, and arguments '
        'for imgcls_jax.main go after --.')
  for main_args in (MAIN_ARGS, ['--workdir', '/tmp/w', '--config=configs/default.py'],
                    ['--config.optim.learning_rate=0.1', '--config=configs/default.py'],
                    ['--mode=predict', '--workdir=/tmp/w'], ['-config', 'configs/default.py']):
    r = _run('local.sh', *base, *main_args)
    assert r.returncode == 0, r.stderr
    assert _after_main(_commands(r.stdout)[0])[:len(main_args)] == main_args


SLURM_ENV = {'SLURM_JOB_ID': '4321', 'SLURM_JOB_NODELIST': 'gpu[007-010],gpu012',
             'SLURM_JOB_NUM_NODES': '5', 'SLURM_GPUS_ON_NODE': '4', 'DRY_RUN': '1'}


def _jax_slurm_coordinator(monkeypatch) -> str:
  """The coordinator JAX's own SLURM detection derives from the same environment."""
  from jax._src.clusters.slurm_cluster import SlurmCluster
  monkeypatch.setenv('SLURM_STEP_NODELIST', SLURM_ENV['SLURM_JOB_NODELIST'])
  monkeypatch.setenv('SLURM_JOB_ID', SLURM_ENV['SLURM_JOB_ID'])
  return SlurmCluster.get_coordinator_address(None, None)


def test_slurm_dry_run_one_process_per_node(monkeypatch):
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '1(x5)',
                                             'SLURM_CPUS_ON_NODE': '96'})
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  export, argv = _commands(r.stdout)
  # srun >= 22.05 passes no --cpus-per-task on by itself: the one process gets all 96 CPUs.
  assert export == ['export', 'SRUN_CPUS_PER_TASK=96']
  assert argv[:5] == ['srun', '--kill-on-bad-exit=1', '--nodes=5', '--ntasks-per-node=1',
                      '--cpus-per-task=96']
  coordinator = _jax_slurm_coordinator(monkeypatch)
  assert coordinator == 'gpu007:61665'  # 4321 % 4096 + 61440
  assert _after_main(argv) == MAIN_ARGS + [
      '--config.distributed.enabled=True',
      f'--config.distributed.coordinator_address={coordinator}',
      '--config.distributed.local_device_ids=0,1,2,3']  # one process drives all 4 GPUs


def test_slurm_dry_run_one_process_per_gpu():
  r = _run('slurm.sbatch', '--dry-run', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '4',
                                                         'SLURM_CPUS_ON_NODE': '96'})
  assert r.returncode == 0, r.stderr
  export, argv = _commands(r.stdout)
  assert export == ['export', 'SRUN_CPUS_PER_TASK=24'] and '--cpus-per-task=24' in argv
  assert '--ntasks-per-node=4' in argv
  assert not any('local_device_ids' in a for a in argv)  # JAX: task i of a node drives GPU i
  assert _after_main(argv)[:len(MAIN_ARGS)] == MAIN_ARGS


def test_slurm_cpus_per_task_from_sbatch_or_the_dry_run_default():
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_CPUS_PER_TASK': '12',
                                             'SLURM_CPUS_ON_NODE': '96'})  # sbatch -c 12 wins
  assert _commands(r.stdout)[0] == ['export', 'SRUN_CPUS_PER_TASK=12'], r.stderr
  assert '--cpus-per-task=12' in _commands(r.stdout)[1]
  r = _run('slurm.sbatch', *MAIN_ARGS, env={'DRY_RUN': '1', 'CPUS_ON_NODE': '32'})
  assert r.returncode == 0, r.stderr
  assert _commands(r.stdout)[0] == ['export', 'SRUN_CPUS_PER_TASK=32']
  assert '32 CPUs per process' in r.stdout


def _directives(script: str) -> dict[str, str]:
  """The script's ``#SBATCH --key[=value]`` lines as {key: value}."""
  with open(os.path.join(REPO, 'launch', script)) as f:
    return dict((m.group(1), m.group(2) or '') for line in f
                if (m := re.match(r'#SBATCH --([\w-]+)(?:=(\S+))?', line)))


def test_sbatch_scripts_ask_for_cpus_a_save_before_the_time_limit_and_requeueing():
  """Whole nodes (the CPUs feed the input pipeline; the default is often 1 CPU a task), SIGTERM
  300 s before the time limit (the run saves a checkpoint), requeued on preemption or node
  failure, the log appended to rather than truncated when requeued."""
  multi = _directives('slurm.sbatch')
  assert 'exclusive' in multi and multi['mem'] == '0'
  assert multi['signal'] == 'TERM@300'      # to the tasks (the srun step), not the batch shell
  assert 'requeue' in multi and multi['open-mode'] == 'append'
  sweep = _directives('slurm_sweep.sbatch')
  assert int(sweep['cpus-per-task']) >= 4
  assert sweep['signal'] == 'B:TERM@300'    # python is the batch shell itself (exec, no srun)
  assert 'requeue' in sweep and sweep['open-mode'] == 'append'
  for script in ('slurm.sbatch', 'slurm_sweep.sbatch', 'tpu_vm.sh', 'local.sh'):
    r = subprocess.run(['bash', '-n', os.path.join(REPO, 'launch', script)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_refuses_bad_layouts_and_running_outside_slurm():
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '3'})
  assert r.returncode == 2 and 'must be 1 (per node) or the GPUs per node (4)' in r.stderr
  r = _run('slurm.sbatch', *MAIN_ARGS)
  assert r.returncode == 2 and 'not inside a SLURM job' in r.stderr


@pytest.mark.parametrize('env, example', [
    ({'TASKS_PER_NODE': '0'}, '1'),        # was bash's `division by 0` first
    ({'NODES': 'abc'}, '2'),               # went into srun --nodes=abc
    ({'GPUS_PER_NODE': '0'}, '8'),         # an empty local_device_ids=
    ({'GPUS_PER_NODE': 'a100:0'}, '8'),
    ({'CPUS_ON_NODE': 'many'}, '64'),
    ({'SLURM_NTASKS_PER_NODE': 'x(x2)'}, '1'),
], ids=lambda v: ' '.join(f'{k}={x}' for k, x in v.items()) if isinstance(v, dict) else None)
def test_slurm_dry_run_counts_must_be_positive_integers(env, example):
  ((name, value),) = env.items()
  r = _run('slurm.sbatch', *MAIN_ARGS, env={'DRY_RUN': '1', **env})
  assert r.returncode == 2 and r.stdout == '', r.stdout
  value = value.split(':')[-1].split('(')[0]
  assert r.stderr.strip() == (f"slurm.sbatch: {name} must be a positive integer (e.g. "
                              f"{name}={example}), not '{value}'.")


def _remote_main_args(ssh_argv: list[str]) -> list[str]:
  """MAIN_ARGS as the run's ``--command`` (a shell line with ``setsid bash -c 'TRAIN'``) passes
  them."""
  assert ssh_argv[-1].startswith('--command=')
  remote = shlex.split(ssh_argv[-1][len('--command='):])
  train = remote[remote.index('setsid') + 3]   # setsid bash -c 'TRAIN; echo $? > STATUS'
  train = train[:train.rindex('; echo $? >')]
  assert remote[remote.index('setsid') + 1:remote.index('setsid') + 3] == ['bash', '-c']
  return _after_main(shlex.split(train))


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  r = _run('tpu_vm.sh', '--name', 'exp1', '--zone', 'us-central2-b', '--project', 'proj',
           '--accelerator-type', 'v4-32', '--spot', '--dry-run', 'all', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  cmds = _commands(r.stdout)
  where = ['--zone=us-central2-b', '--project=proj']
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'exp1', *where,
                     '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']
  files = '/tmp/imgcls_jax-exp1.tgz.files'
  assert cmds[1][:3] == ['git', '-C', REPO] and cmds[1][-2:] == ['>', files]
  assert 'ls-files' in cmds[1] and '--exclude-standard' in cmds[1]
  assert cmds[2][:2] == ['tar', '-czf'] and cmds[2][-5:] == ['-C', REPO, '--null', '-T', files]
  assert cmds[3][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in cmds[3]
  ssh = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert len(ssh) == 4  # unpack, install, run, follow the log
  assert all('--worker=all' in c for c in ssh[:3]) and '--worker=0' in ssh[3]
  install = ssh[1][-1]
  assert 'uv pip install' in install and "jax[tpu]" in install
  run_cmd = ssh[2][-1]   # detached: a dropped SSH connection leaves it running
  assert 'nohup setsid bash -c' in run_cmd and '> ~/imgcls_run.log 2>&1 < /dev/null &' in run_cmd
  assert _remote_main_args(ssh[2]) == MAIN_ARGS + ['--config.distributed.enabled=True']
  assert 'tail -n +1 --pid=' in ssh[3][-1]
  assert cmds[-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'exp1', *where, '--quiet']


@pytest.mark.parametrize('accel, version', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v3-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_vm_software_version_follows_the_accelerator_type(accel, version):
  """https://cloud.google.com/tpu/docs/runtimes; --version (or RUNTIME_VERSION) overrides it."""
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--dry-run', 'create')
  assert r.returncode == 0, r.stderr
  assert f'--version={version}' in _commands(r.stdout)[0]
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--version=mine', '--dry-run',
           'create')
  assert '--version=mine' in _commands(r.stdout)[0]
  r = _run('tpu_vm.sh', '--zone=z', f'--accelerator-type={accel}', '--dry-run', 'create',
           env={'RUNTIME_VERSION': 'env-version'})
  assert '--version=env-version' in _commands(r.stdout)[0]


def test_tpu_vm_single_actions_and_errors():
  r = _run('tpu_vm.sh', '--zone', 'z', '--name', 'n', '--dry-run', 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0 and len(_commands(r.stdout)) == 1
  r = _run('tpu_vm.sh', '--zone', 'z', '--worker=2', '--dry-run', 'logs')
  (logs,) = _commands(r.stdout)
  assert '--worker=2' in logs and logs[-1].startswith('--command=')
  r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', 'stop')
  (stop,) = _commands(r.stdout)
  assert '--worker=all' in stop and 'pkill -TERM -P' in stop[-1]
  r = _run('tpu_vm.sh', '--zone', 'z', '--accelerator-type', 'tpu7x-8', '--dry-run', 'create')
  assert r.returncode == 2 and 'no default TPU software version' in r.stderr
  assert 'give --version' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', '--worker', 'w1', '--dry-run', 'logs')
  assert r.returncode == 2 and '--worker must be a worker number' in r.stderr
  r = _run('tpu_vm.sh', '--dry-run', 'create')
  assert r.returncode == 2 and 'give --zone' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', 'run')
  assert r.returncode == 2 and 'no arguments for imgcls_jax.main' in r.stderr
  r = _run('tpu_vm.sh', '--zone', 'z', 'launch')
  assert r.returncode == 2 and "unknown argument 'launch'" in r.stderr
  # --opt=value, as the README and the script's own hint write it, is --opt value.
  spaced = _run('tpu_vm.sh', '--zone', 'z', '--accelerator-type', 'v4-32', '--dry-run', 'create')
  joined = _run('tpu_vm.sh', '--zone=z', '--accelerator-type=v4-32', '--dry-run', 'create')
  assert joined.returncode == 0, joined.stderr
  assert _commands(joined.stdout) == _commands(spaced.stdout)
  assert '--accelerator-type=v4-32' in _commands(joined.stdout)[0]


def test_tpu_vm_refuses_more_than_one_action():
  """The usage gives one ACTION: `create delete` ran only the delete, `run logs` never started the
  run."""
  for actions in (['create', 'delete'], ['run', 'logs'], ['stop', 'stop', 'delete']):
    r = _run('tpu_vm.sh', '--zone', 'z', '--dry-run', *actions, '--', *MAIN_ARGS)
    assert r.returncode == 2 and r.stdout == '', r.stdout
    assert r.stderr.strip() == (f'tpu_vm.sh: give one ACTION, not {len(actions)} '
                                f'({" ".join(actions)}); run tpu_vm.sh once for each, or use all.')


# ---- tpu_vm.sh really running, against a stand-in gcloud whose "workers" are this machine ----

# `ssh --command=C` runs C with HOME set to the fake worker's home; `scp SRC NAME:DEST` copies SRC
# there; every call is logged.
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "gcloud $*" >> "$FAKE_LOG"
case "$4" in
  ssh) for a; do case $a in --command=*) cmd=${a#--command=};; esac; done
       cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec bash -c "$cmd" ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
esac
"""
# The worker's python: prints its arguments; exits FAKE_EXIT after a second, else runs until
# SIGTERM, when it "saves a checkpoint" and exits 0.
FAKE_WORKER_PYTHON = """#!/usr/bin/env bash
trap 'echo "saved a checkpoint"; exit 0' TERM
printf 'arg:%s\\n' "$@"
if [[ -n ${FAKE_EXIT:-} ]]; then sleep 1; exit "$FAKE_EXIT"; fi
while :; do sleep 0.1; done
"""


@pytest.fixture
def fake_tpu(tmp_path):
  """(a git checkout holding launch/tpu_vm.sh, the environment for it, the fake worker's home)."""
  repo, home, bin_dir = tmp_path / 'repo', tmp_path / 'home', tmp_path / 'bin'
  for d in (repo / 'launch', home / '.local' / 'bin', home / 'imgcls_venv' / 'bin', bin_dir,
            home / 'imgcls_jax'):
    d.mkdir(parents=True)
  for path, text in ((bin_dir / 'gcloud', FAKE_GCLOUD),
                     (home / 'imgcls_venv' / 'bin' / 'python', FAKE_WORKER_PYTHON),
                     (home / '.local' / 'bin' / 'uv', '#!/bin/sh\n')):
    path.write_text(text)
    path.chmod(0o755)
  with open(os.path.join(REPO, 'launch', 'tpu_vm.sh')) as f:
    (repo / 'launch' / 'tpu_vm.sh').write_text(f.read())
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'FAKE_HOME': str(home),
         'FAKE_LOG': str(tmp_path / 'gcloud.log'), 'GIT_CONFIG_GLOBAL': os.devnull}
  name = f'imgcls-test-{os.getpid()}'
  yield repo, env, home, ['--name', name, '--zone', 'z']
  pid_file = home / 'imgcls_run.pid'
  if pid_file.exists():   # a run the test left going: its process group (setsid: its own)
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass
  for path in (f'/tmp/imgcls_jax-{name}.tgz', f'/tmp/imgcls_jax-{name}.tgz.files'):
    if os.path.exists(path):
      os.remove(path)


def _tpu(repo, env, *args) -> subprocess.CompletedProcess:
  return subprocess.run(['bash', str(repo / 'launch' / 'tpu_vm.sh'), *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=60)


def test_tpu_vm_all_copies_the_sources_only_runs_follows_and_deletes(fake_tpu):
  repo, env, home, where = fake_tpu
  kept = ['launch/tpu_vm.sh', 'imgcls_jax/a.py', 'benchmarks/b.py', 'notes.txt', '.gitignore']
  left = ['runs/r1/checkpoints/1/state', 'benchmarks/.data/big.bin', 'benchmarks/.vendor/v.js',
          'node_modules/m.js', 'imgcls_jax/__pycache__/a.cpython-311.pyc', 'arrays.npz',
          'weights.safetensors', '.venv/bin/python', 'debug.log']
  for rel in kept[1:] + left:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(rel)
  (repo / '.gitignore').write_text('*.log\n')
  subprocess.run(['git', 'init', '-q', str(repo)], check=True, env=env)
  subprocess.run(['git', '-C', str(repo), 'add', 'launch', 'imgcls_jax/a.py', '.gitignore'],
                 check=True, env=env)
  r = _tpu(repo, {**env, 'FAKE_EXIT': '3'}, *where, 'all', '--', *MAIN_ARGS)
  print(r.stdout, r.stderr)
  assert r.returncode == 3, r.stderr   # the run's status
  copied = sorted(str(p.relative_to(home / 'imgcls_jax'))
                  for p in (home / 'imgcls_jax').rglob('*') if p.is_file())
  assert copied == sorted(kept)
  assert [line[len('arg:'):] for line in r.stdout.splitlines() if line.startswith('arg:')] == [
      '-m', 'imgcls_jax.main', *MAIN_ARGS, '--config.distributed.enabled=True']
  assert 'the run ended with status 3 on every worker' in r.stdout
  with open(env['FAKE_LOG']) as f:
    calls = f.read().splitlines()
  assert [c.split()[4] for c in calls] == ['create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh', 'ssh',
                                           'delete']


def test_tpu_vm_run_is_detached_and_followed_stopped_by_logs_and_stop(fake_tpu):
  """A dropped SSH connection must not stop training: the run outlives the command that started
  it, in a session of its own; `logs` shows it, `stop` makes it save and exit."""
  repo, env, home, where = fake_tpu
  r = _tpu(repo, env, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  assert 'output in ~/imgcls_run.log' in r.stdout
  pid = int((home / 'imgcls_run.pid').read_text())
  os.kill(pid, 0)                      # still running after tpu_vm.sh (the "ssh") has exited
  # Its own session, so no hangup reaches it. `$!` is nohup's pid, which execs setsid, which calls
  # setsid(2): on a loaded machine that comes a moment after tpu_vm.sh returns.
  deadline = time.monotonic() + 20
  while os.getsid(pid) != pid and time.monotonic() < deadline:
    time.sleep(0.05)
  assert os.getsid(pid) == pid
  r = _tpu(repo, env, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode != 0 and 'a run is still going on' in r.stderr
  deadline = time.monotonic() + 20       # started (its SIGTERM trap set) before it is stopped
  while 'arg:' not in (home / 'imgcls_run.log').read_text() and time.monotonic() < deadline:
    time.sleep(0.1)
  r = _tpu(repo, env, *where, 'stop')
  assert r.returncode == 0 and 'sent SIGTERM to the run' in r.stdout, r.stderr
  deadline = time.monotonic() + 20
  while not (home / 'imgcls_run.status').exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert (home / 'imgcls_run.status').read_text().strip() == '0'
  r = _tpu(repo, env, *where, 'logs')
  assert r.returncode == 0, r.stderr
  assert 'arg:--workdir=/shared/runs/exp 1' in r.stdout and 'saved a checkpoint' in r.stdout
  assert r.stdout.rstrip().endswith(': 0')


def test_tpu_vm_stop_with_no_run_going_says_so(fake_tpu):
  """No pid file printed pkill's usage text; a run that had ended, nothing at all (status 1)."""
  repo, env, home, where = fake_tpu
  no_run = f'tpu_vm.sh: no run is going on {os.uname().nodename}, so there is nothing to stop.'
  r = _tpu(repo, env, *where, 'stop')                   # none ever started
  assert (r.returncode, r.stdout.strip(), r.stderr) == (0, no_run, '')
  r = _tpu(repo, {**env, 'FAKE_EXIT': '0'}, *where, 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  pid = int((home / 'imgcls_run.pid').read_text())
  deadline = time.monotonic() + 20                      # the run ends by itself
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  assert (home / 'imgcls_run.status').read_text().strip() == '0'
  r = _tpu(repo, env, *where, 'stop')
  assert (r.returncode, r.stdout.strip(), r.stderr) == (0, no_run, '')


@pytest.mark.parametrize('script', ['local.sh', 'tpu_vm.sh'])
def test_help_prints_usage(script):
  r = _run(script, '--help')
  assert r.returncode == 0 and 'Usage:' in r.stdout and '--dry-run' in r.stdout


def test_slurm_sweep_gives_each_array_task_its_shard():
  env = {'SLURM_ARRAY_TASK_ID': '7', 'SLURM_ARRAY_TASK_MIN': '5', 'SLURM_ARRAY_TASK_COUNT': '3',
         'PYTHON': sys.executable}
  r = _run('slurm_sweep.sbatch', '--dry-run', *MAIN_ARGS, env=env)
  assert r.returncode == 0, r.stderr
  (argv,) = _commands(r.stdout)
  assert argv[:3] == [sys.executable, '-m', 'imgcls_jax.main']
  assert _after_main(argv) == MAIN_ARGS + ['--config.sweep.shard=2/3']
  r = _run('slurm_sweep.sbatch', *MAIN_ARGS, env={**env, 'SLURM_ARRAY_TASK_STEP': '2'})
  assert r.returncode == 2 and 'not in a contiguous array of 3 tasks' in r.stderr
  r = _run('slurm_sweep.sbatch', *MAIN_ARGS)
  assert r.returncode == 2 and 'not a task of a SLURM job array' in r.stderr
  r = _run('slurm_sweep.sbatch', env=env)
  assert r.returncode == 2 and 'no arguments for imgcls_jax.main' in r.stderr


# ---- local.sh really running: how it stops its processes and waits for them ----

# A stand-in for python: `-c CODE` runs python (local.sh picks its free port so); `-m
# imgcls_jax.main ...` prints, fails after a second when FAKE_FAIL is its process id, and on
# SIGTERM sleeps FAKE_SAVE seconds ("saving a checkpoint") before its last line and exit 0.
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
for a; do case $a in --config.distributed.process_id=*) id=${{a#*=}};; esac; done
trap 'sleep ${{FAKE_SAVE:-1}}; echo "p$id saved; To resume, rerun"; exit 0' TERM
echo "p$id running"
if [[ ${{FAKE_FAIL:-}} == "$id" ]]; then sleep 1; echo "p$id failing"; exit 3; fi
while :; do sleep 0.1; done
"""


def _survivors(mark: str) -> list[int]:
  """Processes whose command line contains ``mark`` (a test's own temporary path)."""
  out = subprocess.run(['pgrep', '-f', mark], capture_output=True, text=True).stdout
  return [int(pid) for pid in out.split() if int(pid) != os.getpid()]


def _kill(pids: list[int]) -> None:
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


class _Launch:
  """``local.sh ARGS`` in the background; ``lines`` receives its output (stdout and stderr)."""

  def __init__(self, args: list[str], mark: str, env: dict[str, str] | None = None):
    self.mark, self.lines, self.seen = mark, queue.Queue(), []
    # SIGINT as at a terminal: a suite started in the background of a non-interactive shell
    # (e.g. `nohup ... &`) runs with it ignored, which bash then cannot trap (coreutils' env
    # resets it; a preexec_fn would fork a process JAX's threads share).
    self.proc = subprocess.Popen(['env', '--default-signal=INT', 'bash',
                                  os.path.join(REPO, 'launch', 'local.sh'), *args],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def wait_for(self, text: str, timeout: float) -> str:
    """The first line (seen so far or next) that contains ``text``."""
    for line in self.seen:
      if text in line:
        return line
    deadline = time.monotonic() + timeout
    while True:
      try:
        line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        raise AssertionError(f'no {text!r} after {timeout}s:\n' + ''.join(self.seen)) from None
      if line is None:
        raise AssertionError(f'output ended before {text!r}:\n' + ''.join(self.seen))
      self.seen.append(line)
      if text in line:
        return line

  def finish(self, timeout: float) -> tuple[int, str, list[int]]:
    """Its status, its whole output, and what of its processes outlived it (then killed)."""
    try:
      rc = self.proc.wait(timeout=timeout)
    finally:
      left = _survivors(self.mark)  # at once: the script must have waited for them
      _kill(left + ([self.proc.pid] if self.proc.poll() is None else []))
    while (line := self.lines.get(timeout=10)) is not None:
      self.seen.append(line)
    return rc, ''.join(self.seen), left


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / 'fake python'  # the space: local.sh quotes it
  path.write_text(FAKE_PYTHON)
  path.chmod(0o755)
  yield str(path)
  _kill(_survivors(str(tmp_path)))


def test_local_a_failing_process_stops_the_others_and_waits_for_them(fake_python):
  env = {**os.environ, 'FAKE_FAIL': '1', 'FAKE_SAVE': '2'}
  run = _Launch(['-n', '3', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python, env)
  rc, out, left = run.finish(timeout=30)
  assert left == [], out   # the old script returned at once, the others still saving
  assert rc == 3, out      # the failure's status
  assert 'local.sh: process 1 exited with status 3; stopping the others.' in out
  assert 'local.sh: sent SIGTERM to process(es) 0 2; SIGKILL in 90s if still running.' in out
  for i in (0, 2):         # their output is not cut off: each one's last line arrives
    assert f'[p{i}] p{i} saved; To resume, rerun' in out
    assert f'local.sh: process {i} exited with status 0.' in out
  assert out.rstrip().endswith('local.sh: all processes have exited; status 3.')


def test_local_sigterm_stops_the_processes_and_returns_after_them(fake_python):
  run = _Launch(['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python,
                {**os.environ, 'FAKE_SAVE': '2'})
  run.wait_for('[p0] p0 running', 30)
  run.wait_for('[p1] p1 running', 30)
  started = time.monotonic()
  run.proc.send_signal(signal.SIGTERM)
  rc, out, left = run.finish(timeout=30)
  assert left == [] and rc == 143, out  # the old script: 130 at once, the processes left behind
  assert time.monotonic() - started >= 1.5, out  # it waited for their 2 s "checkpoint"
  assert 'local.sh: got SIGTERM; stopping the processes.' in out
  assert '[p0] p0 saved; To resume, rerun' in out and '[p1] p1 saved; To resume, rerun' in out


def test_local_sigkills_after_the_grace_period_and_at_a_second_signal(fake_python):
  env = {**os.environ, 'FAKE_SAVE': '60'}  # they would "save" for a minute
  args = ['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w']
  run = _Launch(['--grace', '1', *args], fake_python, env)
  run.wait_for('[p1] p1 running', 30)
  run.wait_for('[p0] p0 running', 30)
  run.proc.send_signal(signal.SIGINT)
  rc, out, left = run.finish(timeout=20)
  assert left == [] and rc == 130, out
  assert 'local.sh: still running 1s after SIGTERM; sent SIGKILL to process(es) 0 1.' in out
  assert 'local.sh: process 0 exited with status 137.' in out and 'saved' not in out
  assert 'Killed' not in out  # bash's own notices of the killed jobs stay out of the output

  run = _Launch(args, fake_python, env)  # the default grace, 90 s: a second Ctrl-C kills now
  run.wait_for('[p1] p1 running', 30)
  run.wait_for('[p0] p0 running', 30)
  run.proc.send_signal(signal.SIGINT)
  run.wait_for('sent SIGTERM', 10)
  time.sleep(0.5)  # bash drops a SIGINT that comes while its SIGINT trap still runs
  run.proc.send_signal(signal.SIGINT)
  rc, out, left = run.finish(timeout=20)
  assert left == [] and rc == 130, out
  assert 'local.sh: got SIGINT while stopping; sent SIGKILL to process(es) 0 1.' in out


def test_local_killed_outright_stops_its_processes(fake_python):
  """kill -9 of the launcher runs no trap: its processes trained on as orphans (and held the run
  directory's lock against the rerun). The kernel now sends each SIGTERM: they save and stop."""
  import shutil
  if not shutil.which('setpriv'):
    pytest.skip('no setpriv (util-linux) here')
  run = _Launch(['-n', '2', '--python', fake_python, '--', '--workdir=/tmp/w'], fake_python,
                {**os.environ, 'FAKE_SAVE': '0'})
  run.wait_for('[p0] p0 running', 30)
  run.wait_for('[p1] p1 running', 30)
  run.proc.send_signal(signal.SIGKILL)
  deadline = time.monotonic() + 20
  while _survivors(fake_python) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = _survivors(fake_python)
  _kill(left)
  assert left == []


# ---- with two real training processes (2 x 1 CPU device, the default config on the digits) ----

def _train(tmp_path, tfds_dir: str, *local_args: str) -> _Launch:
  workdir = str(tmp_path / 'run')
  # A config file asking for 2 CPU devices: local.sh's --cpu-devices 1 must win.
  (tmp_path / 'two_devices.py').write_text(
      'from configs import default\n\n\ndef get_config():\n  c = default.get_config()\n'
      '  c.mesh.cpu_devices = 2\n  return c\n')
  args = ['-n', '2', '--cpu-devices', '1', *local_args, '--python', sys.executable, '--',
          f'--config={tmp_path / "two_devices.py"}', f'--workdir={workdir}',
          f'--config.data.data_dir={tfds_dir}', '--config.num_train_steps=100000',
          '--config.log_every_steps=1000', '--config.eval_every_steps=-1',
          '--config.eval_every_epochs=-1', '--config.checkpoint_every_epochs=-1',
          '--config.checkpoint_every_steps=-1', '--config.tensorboard=False']
  return _Launch(args, workdir, subprocess_env())


@pytest.mark.slow
def test_local_a_killed_process_leaves_no_other_behind(tmp_path, tfds_dir):
  run = _train(tmp_path, tfds_dir, '--grace', '5')
  run.wait_for('First training step done', 90)
  (victim,) = _survivors(f'{run.mark} .*process_id=1$')  # process 1's python
  os.kill(victim, signal.SIGKILL)
  rc, out, left = run.finish(timeout=60)
  assert left == [], out  # the old script returned at once; process 0 lived on for ~90 s
  assert rc == 137, out
  assert 'local.sh: process 1 exited with status 137; stopping the others.' in out
  assert re.search(r'local.sh: process 0 exited with status \d+\.', out), out


@pytest.mark.slow
def test_local_sigterm_lets_the_processes_save_and_say_how_to_resume(tmp_path, tfds_dir):
  run = _train(tmp_path, tfds_dir)
  run.wait_for('First training step done', 90)
  run.proc.send_signal(signal.SIGTERM)
  rc, out, left = run.finish(timeout=120)
  assert left == [] and rc == 143, out
  assert '1 local devices, 2 in all' in out and '2 local devices' not in out
  assert re.search(r'\[p0\] Stopped by SIGTERM.* at step \d+ of 100000; checkpoint saved in .*'
                   r'To resume, rerun the same launch command', out), out
  assert 'local.sh: process 0 exited with status 0.' in out
  assert 'local.sh: process 1 exited with status 0.' in out
  assert os.listdir(tmp_path / 'run' / 'checkpoints')
