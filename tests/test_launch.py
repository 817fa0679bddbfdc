"""launch/ scripts: each dry run prints the exact commands, with the config passed through intact.

(``launch/local.sh`` also really runs in tests/test_multihost.py.)
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

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
        '--config.distributed.enabled=True',
        '--config.distributed.coordinator_address=127.0.0.1:12345',
        '--config.distributed.num_processes=3', f'--config.distributed.process_id={i}']


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


SLURM_ENV = {'SLURM_JOB_ID': '4321', 'SLURM_JOB_NODELIST': 'gpu[007-010],gpu012',
             'SLURM_JOB_NUM_NODES': '5', 'SLURM_GPUS_ON_NODE': '4', 'DRY_RUN': '1'}


def _jax_slurm_coordinator(monkeypatch) -> str:
  """The coordinator JAX's own SLURM detection derives from the same environment."""
  from jax._src.clusters.slurm_cluster import SlurmCluster
  monkeypatch.setenv('SLURM_STEP_NODELIST', SLURM_ENV['SLURM_JOB_NODELIST'])
  monkeypatch.setenv('SLURM_JOB_ID', SLURM_ENV['SLURM_JOB_ID'])
  return SlurmCluster.get_coordinator_address(None, None)


def test_slurm_dry_run_one_process_per_node(monkeypatch):
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '1(x5)'})
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  (argv,) = _commands(r.stdout)
  assert argv[:4] == ['srun', '--kill-on-bad-exit=1', '--nodes=5', '--ntasks-per-node=1']
  coordinator = _jax_slurm_coordinator(monkeypatch)
  assert coordinator == 'gpu007:61665'  # 4321 % 4096 + 61440
  assert _after_main(argv) == MAIN_ARGS + [
      '--config.distributed.enabled=True',
      f'--config.distributed.coordinator_address={coordinator}',
      '--config.distributed.local_device_ids=0,1,2,3']  # one process drives all 4 GPUs


def test_slurm_dry_run_one_process_per_gpu():
  r = _run('slurm.sbatch', '--dry-run', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '4'})
  assert r.returncode == 0, r.stderr
  (argv,) = _commands(r.stdout)
  assert '--ntasks-per-node=4' in argv
  assert not any('local_device_ids' in a for a in argv)  # JAX: task i of a node drives GPU i
  assert _after_main(argv)[:len(MAIN_ARGS)] == MAIN_ARGS


def test_slurm_refuses_bad_layouts_and_running_outside_slurm():
  r = _run('slurm.sbatch', *MAIN_ARGS, env={**SLURM_ENV, 'SLURM_NTASKS_PER_NODE': '3'})
  assert r.returncode == 2 and 'must be 1 (per node) or the GPUs per node (4)' in r.stderr
  r = _run('slurm.sbatch', *MAIN_ARGS)
  assert r.returncode == 2 and 'not inside a SLURM job' in r.stderr


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  r = _run('tpu_vm.sh', '--name', 'exp1', '--zone', 'us-central2-b', '--project', 'proj',
           '--accelerator-type', 'v4-32', '--spot', '--dry-run', 'all', '--', *MAIN_ARGS)
  assert r.returncode == 0, r.stderr
  print(r.stdout)
  cmds = _commands(r.stdout)
  where = ['--zone=us-central2-b', '--project=proj']
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'exp1', *where,
                     '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base', '--spot']
  assert cmds[1][:2] == ['tar', '-czf'] and cmds[1][-3:] == ['-C', REPO, '.']
  assert cmds[2][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in cmds[2]
  ssh = [c for c in cmds if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  assert len(ssh) == 3 and all('--worker=all' in c for c in ssh)  # unpack, install, run
  install = ssh[1][-1]
  assert 'uv pip install' in install and "jax[tpu]" in install
  run_cmd = ssh[2][-1]
  assert run_cmd.startswith('--command=')
  remote = shlex.split(run_cmd[len('--command='):])
  assert _after_main(remote) == MAIN_ARGS + ['--config.distributed.enabled=True']
  assert cmds[-1] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'exp1', *where, '--quiet']


def test_tpu_vm_single_actions_and_errors():
  r = _run('tpu_vm.sh', '--zone', 'z', '--name', 'n', '--dry-run', 'run', '--', *MAIN_ARGS)
  assert r.returncode == 0 and len(_commands(r.stdout)) == 1
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
