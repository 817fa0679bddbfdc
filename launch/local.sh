#!/usr/bin/env bash
# N processes of one imgcls_jax run on this machine, joined by jax.distributed.
#
# Usage:
#   launch/local.sh [-n NUM] [--cpu-devices K | --gpus-per-process K] [--port PORT]
#                   [--timeout SECONDS] [--python PYTHON] [--dry-run] -- MAIN_ARGS...
#
#   -n NUM                processes to start (default 2)
#   --cpu-devices K       CPU only: each process gets K fake CPU devices (a multi-host rehearsal)
#   --gpus-per-process K  process i drives GPUs i*K .. i*K+K-1 (config.distributed.local_device_ids)
#   --port PORT           coordinator port on 127.0.0.1 (default: a free one, picked by binding 0)
#   --timeout SECONDS     kill every process after this long (default: no limit)
#   --python PYTHON       interpreter (default: $PYTHON, else python3)
#   --dry-run             print the exact commands and exit
#   MAIN_ARGS             passed to `python -m imgcls_jax.main` unchanged, e.g.
#                         --config=configs/default.py --workdir=/tmp/run --config.batch_size=256
#
# Output lines are prefixed with [pI]. If one process fails, the others are stopped and the
# script exits with the first failing status.
set -euo pipefail

# Shell-quotes each argument (single quotes where needed), space-separated: copy-pasteable.
quote() {
  local out='' a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

num=2 cpu_devices='' gpus_per_process='' port='' timeout_s='' dry_run=0
python="${PYTHON:-python3}"
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "local.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="${2:?}"; shift 2 ;;
    --cpu-devices) cpu_devices="${2:?}"; shift 2 ;;
    --gpus-per-process) gpus_per_process="${2:?}"; shift 2 ;;
    --port) port="${2:?}"; shift 2 ;;
    --timeout) timeout_s="${2:?}"; shift 2 ;;
    --python) python="${2:?}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
main_args=("$@")

[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num'."
[[ -z "$cpu_devices" || "$cpu_devices" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer."
[[ -z "$gpus_per_process" || "$gpus_per_process" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-process must be a positive integer."
[[ -z "$cpu_devices" || -z "$gpus_per_process" ]] || die "give --cpu-devices or --gpus-per-process, not both."
[[ -z "$timeout_s" || "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds."
[[ ${#main_args[@]} -gt 0 ]] || die "no arguments for imgcls_jax.main; e.g. -- --config=configs/default.py --workdir=/tmp/run"

if [[ -z "$port" ]]; then
  if [[ $dry_run == 1 ]] && ! command -v "$python" >/dev/null; then port=PORT
  else
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi

# The command of process $1, one word per array element.
command_for() {
  local i=$1
  cmd=()
  if [[ -n "$cpu_devices" ]]; then
    local flags='' f
    for f in ${XLA_FLAGS:-}; do  # keep the user's XLA flags, except an older device count
      [[ "$f" == --xla_force_host_platform_device_count=* ]] || flags+="$f "
    done
    cmd+=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$flags--xla_force_host_platform_device_count=$cpu_devices")
  fi
  [[ -z "$timeout_s" ]] || cmd+=(timeout --signal=KILL "$timeout_s")
  cmd+=("$python" -m imgcls_jax.main "${main_args[@]}"
        --config.distributed.enabled=True
        "--config.distributed.coordinator_address=127.0.0.1:$port"
        "--config.distributed.num_processes=$num"
        "--config.distributed.process_id=$i")
  if [[ -n "$gpus_per_process" ]]; then
    local ids='' d
    for ((d = i * gpus_per_process; d < (i + 1) * gpus_per_process; d++)); do ids+="${ids:+,}$d"; done
    cmd+=("--config.distributed.local_device_ids=$ids")
  fi
}

if [[ $dry_run == 1 ]]; then
  echo "# local.sh dry run: $num processes, coordinator 127.0.0.1:$port"
  for ((i = 0; i < num; i++)); do
    command_for "$i"
    echo "$(quote "${cmd[@]}") &"
  done
  echo "wait"
  exit 0
fi

set -m  # each process in its own process group, so a failure stops all of its children
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < num; i++)); do
  command_for "$i"
  ( "${cmd[@]}" 2>&1 | sed -u "s/^/[p$i] /"; exit "${PIPESTATUS[0]}" ) &
  pids+=($!)
done

status=0
for ((k = 0; k < num; k++)); do
  if wait -n 2>/dev/null; then continue; else
    rc=$?
    if [[ $status == 0 ]]; then
      status=$rc
      echo "local.sh: a process exited with status $rc; stopping the others." >&2
      stop_all
    fi
  fi
done
trap - INT TERM
exit "$status"
