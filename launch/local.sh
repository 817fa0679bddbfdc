#!/usr/bin/env bash
# N processes of one imgcls_jax run on this machine, joined by jax.distributed.
#
# Usage:
#   launch/local.sh [-n NUM] [--cpu-devices K | --gpus-per-process K] [--port PORT]
#                   [--timeout SECONDS] [--grace SECONDS] [--python PYTHON] [--dry-run]
#                   -- MAIN_ARGS...
#
#   -n NUM                processes to start (default 2)
#   --cpu-devices K       CPU only: each process gets K fake CPU devices (a multi-host rehearsal);
#                         also sets --config.mesh.cpu_devices=K, over the config file's value (a
#                         different --config.mesh.cpu_devices in MAIN_ARGS is refused)
#   --gpus-per-process K  process i drives GPUs i*K .. i*K+K-1 (config.distributed.local_device_ids)
#   --port PORT           coordinator port on 127.0.0.1 (default: a free one, picked by binding 0)
#   --timeout SECONDS     kill every process after this long (default: no limit)
#   --grace SECONDS       once stopping, how long the processes get after SIGTERM to save a
#                         checkpoint and exit before SIGKILL (default 90)
#   --python PYTHON       interpreter (default: $PYTHON, else python3)
#   --dry-run             print the exact commands and exit
#   MAIN_ARGS             passed to `python -m imgcls_jax.main` unchanged, e.g.
#                         --config=configs/default.py --workdir=/tmp/run --config.batch_size=256
#                         (the -- may be left out when they begin with --config, --workdir or
#                         --mode; any other unknown option is refused)
#
# Output lines are prefixed with [pI]. If one process fails, or this script gets SIGINT / SIGTERM /
# SIGHUP, every process still running gets SIGTERM (a training run saves a checkpoint and exits),
# then SIGKILL after the grace period (a second signal: at once). The script returns only when all
# of them have exited: with the first failing status (a process's own before the 75 of the others,
# which lost it), else 130 / 143 / 129 after a signal.
set -euo pipefail

# Shell-quotes each argument (single quotes where needed), space-separated: copy-pasteable.
quote() {
  local out='' a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

num=2 cpu_devices='' gpus_per_process='' port='' timeout_s='' grace=90 dry_run=0
python="${PYTHON:-python3}"
usage() { sed -n '2,/^[^#]/{ /^#/{ s/^# \{0,1\}//; p; }; }' "$0"; }  # the comment above
die() { echo "local.sh: $*" >&2; exit 2; }
# OPTION VALUE EXAMPLE: a value that is missing, empty or another option (--...) is refused.
need() { [[ -n "$2" && "$2" != --* ]] || die "$1 needs a value, e.g. $1 $3."; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) need "$1" "${2:-}" 2; num="$2"; shift 2 ;;
    --cpu-devices) need "$1" "${2:-}" 2; cpu_devices="$2"; shift 2 ;;
    --gpus-per-process) need "$1" "${2:-}" 4; gpus_per_process="$2"; shift 2 ;;
    --port) need "$1" "${2:-}" 12345; port="$2"; shift 2 ;;
    --timeout) need "$1" "${2:-}" 3600; timeout_s="$2"; shift 2 ;;
    --grace) need "$1" "${2:-}" 90; grace="$2"; shift 2 ;;
    --python) need "$1" "${2:-}" python3; python="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *)  # MAIN_ARGS without the --: they must begin with a flag of imgcls_jax.main's own
      if ! [[ "$1" =~ ^--?((no)?config\.|(config|workdir|mode|flagfile)(=|$)) ]]; then
        if [[ "$1" == -* ]]; then what=option; else what=argument; fi
        die "unknown $what '$1'; local.sh's options are -n, --cpu-devices, --gpus-per-process," \
            "--port, --timeout, --grace, --python and --dry-run, and arguments for imgcls_jax.main" \
            "go after --."
      fi
      break ;;
  esac
done
main_args=("$@")

[[ "$num" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num'."
[[ -z "$cpu_devices" || "$cpu_devices" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer."
[[ -z "$gpus_per_process" || "$gpus_per_process" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-process must be a positive integer."
[[ -z "$cpu_devices" || -z "$gpus_per_process" ]] || die "give --cpu-devices or --gpus-per-process, not both."
[[ -z "$timeout_s" || "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds."
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'."
[[ ${#main_args[@]} -gt 0 ]] || die "no arguments for imgcls_jax.main; e.g. -- --config=configs/default.py --workdir=/tmp/run"

# --cpu-devices K is passed on as --config.mesh.cpu_devices=K too (main.py applies that one, so
# a config file's value would otherwise win); an explicit different value is a contradiction.
if [[ -n "$cpu_devices" ]]; then
  for ((k = 0; k < ${#main_args[@]}; k++)); do
    a=${main_args[k]}
    if [[ "$a" =~ ^--?config\.mesh\.cpu_devices=(.*)$ ]]; then v=${BASH_REMATCH[1]}
    elif [[ "$a" =~ ^--?config\.mesh\.cpu_devices$ ]]; then v=${main_args[k + 1]:-}; a+=" $v"
    else continue; fi
    [[ "$v" =~ ^0*$cpu_devices$ ]] || die "--cpu-devices $cpu_devices contradicts $a; give one of them."
  done
fi

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
  cmd+=("$python" -m imgcls_jax.main "${main_args[@]}")
  [[ -z "$cpu_devices" ]] || cmd+=("--config.mesh.cpu_devices=$cpu_devices")
  cmd+=(--config.distributed.enabled=True
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

# Each python process writes into a FIFO read by its own sed, which prefixes the lines; both are
# background jobs in process groups of their own (set -m), so a Ctrl-C at the terminal reaches only
# this script, and stopping a process never kills the sed that still has its last lines to print.
fifos=$(mktemp -d "${TMPDIR:-/tmp}/local_sh.XXXXXX")
trap 'rm -rf "$fifos"' EXIT
for ((i = 0; i < num; i++)); do mkfifo "$fifos/p$i"; done

# This script's own messages go to fd 3, a copy of stderr: the polling loop's sleep runs with
# stderr silenced, as bash prints its own "Killed" notices for the jobs there.
exec 3>&2
say() { echo "local.sh: $*" >&3 2>/dev/null || true; }  # (stderr may be gone: carry on)

pids=() seds=() exited=()
status=0 stopping=0 deadline=0 killed=0

# Asks every process still running to stop (SIGTERM to it: a training run finishes its step, saves
# a checkpoint and exits 0); the polling loop below sends SIGKILL once the grace period is over.
stop_all() {
  local i who=''
  stopping=1 deadline=$((SECONDS + grace))
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [[ ${exited[i]} == 0 ]] && kill -TERM "${pids[i]}" 2>/dev/null; then who+=" $i"; fi
  done
  if [[ -n "$who" ]]; then
    say "sent SIGTERM to process(es)$who; SIGKILL in ${grace}s if still running."
  fi
  return 0
}
kill_all() {  # $1: why
  local i who=''
  killed=1
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [[ ${exited[i]} == 0 ]] && kill -KILL -- "-${pids[i]}" 2>/dev/null; then who+=" $i"; fi
  done
  if [[ -n "$who" ]]; then say "$1; sent SIGKILL to process(es)$who."; fi
  return 0
}
on_signal() {  # $1: the signal's name, $2: the status to return for it
  if [[ $stopping == 1 ]]; then
    kill_all "got SIG$1 while stopping"
  else
    status=$2
    say "got SIG$1; stopping the processes."
    stop_all
  fi
  return 0
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

# If this script is killed outright (kill -9: no trap runs), each process gets SIGTERM from the
# kernel, saves and stops, instead of training on as an orphan (setpriv, util-linux; the rerun
# would find the run directory still locked by it).
pdeath=()
if command -v setpriv >/dev/null && setpriv --pdeathsig TERM true 2>/dev/null; then
  pdeath=(setpriv --pdeathsig TERM)
fi

set -m
for ((i = 0; i < num; i++)); do
  [[ $stopping == 0 ]] || break  # a signal while starting them
  command_for "$i"
  # (sed ignores the signals: it ends when its process does, even after a kill of every process)
  (trap '' INT TERM HUP; exec sed -u "s/^/[p$i] /") < "$fifos/p$i" 3>&- &
  seds+=($!)
  "${pdeath[@]}" "${cmd[@]}" > "$fifos/p$i" 2>&1 3>&- &
  pids+=($!) exited+=(0)
  [[ $stopping == 0 ]] || kill -TERM "${pids[i]}" 2>/dev/null || true  # a signal just before
done
set +m  # the polling loop's sleeps stay in this script's process group
started=''
for ((i = 0; i < ${#pids[@]}; i++)); do started+="${started:+, }process $i (pid ${pids[i]})"; done
say "started $started; coordinator 127.0.0.1:$port."

# Poll until every process has exited (bash reaps its children as they exit: kill -0 then fails).
while :; do
  running=0 round=()
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ ${exited[i]} == 0 ]] || continue
    if kill -0 "${pids[i]}" 2>/dev/null; then running=$((running + 1)); continue; fi
    rc=0
    wait "${pids[i]}" 2>/dev/null || rc=$?
    exited[i]=1 round+=("$i:$rc")
  done
  # Status 75 is a process that lost another one (imgcls_jax.distributed): the lost one's own
  # status, if it exited in the same round, is the failure to report.
  for lost_peer in 0 1; do
    for entry in ${round[@]+"${round[@]}"}; do
      i=${entry%%:*} rc=${entry#*:}
      if [[ $rc == 75 ]]; then second=1; else second=0; fi
      (( second == lost_peer )) || continue
      if [[ $stopping == 1 ]]; then
        say "process $i exited with status $rc."
      elif [[ $rc != 0 ]]; then
        status=$rc
        say "process $i exited with status $rc; stopping the others."
        stop_all
      fi
    done
  done
  [[ $running -gt 0 ]] || break
  if [[ $stopping == 1 && $killed == 0 && $SECONDS -ge $deadline ]]; then
    kill_all "still running ${grace}s after SIGTERM"
  fi
  # A wait on a background sleep: a signal to this script alone runs its trap at once (a
  # foreground sleep that exits normally can make bash take the signal as handled by it).
  { sleep 0.2 & wait $!; } 2>/dev/null || true   # (interrupted: >128)
done

# The processes are gone; their seds print what is left in the FIFOs and end (bounded, in case a
# grandchild of a process still holds a FIFO open).
for ((t = 0; t < 50; t++)); do
  running=0
  for pid in "${seds[@]}"; do if kill -0 "$pid" 2>/dev/null; then running=1; fi; done
  [[ $running == 1 ]] || break
  sleep 0.2
done
for pid in "${seds[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
if [[ $stopping == 1 ]]; then say "all processes have exited; status $status."; fi
exit "$status"
