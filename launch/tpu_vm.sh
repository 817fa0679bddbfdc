#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, copy this checkout to every worker, install, start the
# same command on every worker (jax.distributed finds the slice by itself), delete it.
#
# Usage:
#   launch/tpu_vm.sh [options] ACTION [-- MAIN_ARGS...]
#
#   ACTION   one of create | copy | install | run | logs | stop | delete
#            | all (= create, copy, install, run, follow the log until the run ends, delete);
#            several in one call are refused (`all` does them all in order)
#     run    starts the training detached on every worker (nohup setsid; output in
#            ~/imgcls_run.log there, exit status in ~/imgcls_run.status), so a dropped SSH
#            connection does not stop it; refuses while a run is still going
#     logs   follows a worker's log (--worker, default 0) until the run ends; Ctrl-C stops only
#            the following
#     stop   sends the run SIGTERM on every worker: it saves a checkpoint and exits; a worker with
#            no run going (none started, or it has ended) says so, and that is no failure (status 0)
#     all    deletes the slice when the run has ended (whatever its status) or when a step before
#            it fails, unless --keep; if following the log is interrupted, the run and the slice
#            stay up (follow again with `logs`, then `delete`)
#   --name NAME               TPU name (default: $TPU_NAME, else imgcls-$USER)
#   --zone ZONE               zone (default: $ZONE; required), e.g. us-central2-b
#   --project PROJECT         project (default: $PROJECT_ID, else gcloud's default)
#   --accelerator-type TYPE   e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16, v5p-8, v6e-8
#                             (default: $ACCELERATOR_TYPE, else v4-8)
#   --version VERSION         TPU software version (default: $RUNTIME_VERSION, else the one for the
#                             accelerator type: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
#                             v5litepod / v5e -> v2-alpha-tpuv5-lite, v2-v4 -> tpu-ubuntu2204-base)
#   --worker W                worker whose log `logs` follows (default 0; `all` for every one)
#   --spot                    create a Spot TPU (cheaper, may be preempted)
#   --keep                    with `all`: do not delete the slice at the end
#   --dry-run                 print the exact commands and exit
#   MAIN_ARGS                 passed to `python -m imgcls_jax.main` on every worker, e.g.
#                             --config=configs/imagenet_resnet50.py --workdir=/mnt/shared/run1
#                             --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# `copy` sends the files git tracks plus untracked ones it does not ignore (outside a git checkout:
# every file), without runs/, data caches (benchmarks/.data, .vendor), virtual environments,
# node_modules, __pycache__ and weight / array / archive files (*.npz, *.npy, *.pt, *.pth,
# *.safetensors, *.ckpt, *.tgz, *.tar.gz, *.zip).
# On a multi-host slice --workdir must be storage every worker shares (an NFS / Filestore or
# gcsfuse mount): all workers write their shards of each checkpoint there.
set -euo pipefail

# Shell-quotes each argument (single quotes where needed), space-separated: copy-pasteable.
quote() {
  local out='' a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

name="${TPU_NAME:-imgcls-${USER:-user}}" zone="${ZONE:-}" project="${PROJECT_ID:-}"
accel="${ACCELERATOR_TYPE:-v4-8}" version="${RUNTIME_VERSION:-}" worker=0
spot=0 keep=0 dry_run=0 action=''
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir='~/imgcls_jax' remote_venv='~/imgcls_venv'
# On each worker: the run's output, its wrapper's process id, its exit status once it has ended.
remote_log='~/imgcls_run.log' remote_pid='~/imgcls_run.pid' remote_status='~/imgcls_run.status'
# Paths `copy` leaves out (extended regex over paths relative to the checkout).
skip='(^|/)(\.git|\.venv|venv|node_modules|__pycache__|[^/]*\.egg-info)(/|$)|^(runs|data|workdir[^/]*|build|dist)/|^benchmarks/\.(data|vendor)/|\.(npz|npy|pt|pth|safetensors|ckpt|tgz|tar\.gz|zip)$'
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
# OPTION VALUE EXAMPLE: a value that is missing, empty or another option (--...) is refused.
need() { [[ -n "$2" && "$2" != --* ]] || die "$1 needs a value, e.g. $1 $3."; }
actions=()

while [[ $# -gt 0 ]]; do
  case "$1" in  # --opt=value is --opt value
    --name=*|--zone=*|--project=*|--accelerator-type=*|--version=*|--worker=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case "$1" in
    --name) need "$1" "${2:-}" exp1; name="$2"; shift 2 ;;
    --zone) need "$1" "${2:-}" us-central2-b; zone="$2"; shift 2 ;;
    --project) need "$1" "${2:-}" my-project; project="$2"; shift 2 ;;
    --accelerator-type) need "$1" "${2:-}" v4-8; accel="$2"; shift 2 ;;
    --version) need "$1" "${2:-}" tpu-ubuntu2204-base; version="$2"; shift 2 ;;
    --worker) need "$1" "${2:-}" 0; worker="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    create|copy|install|run|logs|stop|delete|all) actions+=("$1"); action="$1"; shift ;;
    *) die "unknown argument '$1' (see --help)." ;;
  esac
done
main_args=("$@")
if [[ ${#actions[@]} -gt 1 ]]; then
  die "give one ACTION, not ${#actions[@]} (${actions[*]}); run tpu_vm.sh once for each, or use all."
fi
[[ -n "$action" ]] || die "give an ACTION: create, copy, install, run, logs, stop, delete or all (see --help)."
[[ -n "$zone" ]] || die "give --zone (or set ZONE), e.g. --zone=us-central2-b."
if [[ "$action" == run || "$action" == all ]] && [[ ${#main_args[@]} -eq 0 ]]; then
  die "no arguments for imgcls_jax.main after --; e.g. -- --config=configs/default.py --workdir=/mnt/shared/run1"
fi

[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker number (0, 1, ...) or all, not '$worker'."
if [[ -z "$version" && ( "$action" == create || "$action" == all ) ]]; then
  # The software version for the TPU generation: https://cloud.google.com/tpu/docs/runtimes
  case "$accel" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for --accelerator-type=$accel; give --version (see https://cloud.google.com/tpu/docs/runtimes)." ;;
  esac
fi

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
tarball="/tmp/imgcls_jax-$name.tgz"

# Runs (or, in a dry run, prints) one command.
do_cmd() {
  if [[ $dry_run == 1 ]]; then quote "$@"; echo; else "$@"; fi
}
on_workers() {  # WORKERS COMMAND
  do_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}
on_all_workers() {
  on_workers all "$1"
}

create() {
  local extra=()
  [[ $spot == 0 ]] || extra+=(--spot)
  do_cmd gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accel" \
    --version="$version" "${extra[@]}"
}
copy() {
  local list="$tarball.files" lister
  if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    lister=(git -C "$repo" ls-files -z --cached --others --exclude-standard)
  else
    lister=(find "$repo" -mindepth 1 "(" -type f -o -type l ")" -printf '%P\0')
  fi
  if [[ $dry_run == 1 ]]; then
    echo "$(quote "${lister[@]}") | $(quote grep -zvE "$skip") > $(quote "$list")"
  else
    "${lister[@]}" | { grep -zvE "$skip" || true; } > "$list"
  fi
  # --ignore-failed-read: a tracked file deleted from the checkout is skipped with a warning.
  do_cmd tar -czf "$tarball" --ignore-failed-read -C "$repo" --null -T "$list"
  do_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:imgcls_jax.tgz" "${where[@]}" --worker=all
  on_all_workers "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf ~/imgcls_jax.tgz -C $remote_dir"
}
install() {
  # TPU images ship Python 3.10; imgcls_jax needs >= 3.11, so uv provides one in a venv.
  on_all_workers "set -e; command -v ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
~/.local/bin/uv venv --python 3.11 --allow-existing $remote_venv; \
~/.local/bin/uv pip install --python $remote_venv/bin/python -e $remote_dir 'jax[tpu]>=0.10.2,<0.12'"
}
run() {
  # Detached from the SSH session (nohup setsid, stdin from /dev/null): the wrapper shell writes
  # python's exit status when it ends; its process id is what `logs` and `stop` look for.
  local train="cd $remote_dir && $remote_venv/bin/python -m imgcls_jax.main $(quote "${main_args[@]}") --config.distributed.enabled=True; echo \$? > $remote_status"
  on_all_workers "if [ -f $remote_pid ] && kill -0 \$(cat $remote_pid) 2>/dev/null; then \
echo \"a run is still going on \$(hostname) (tpu_vm.sh stop ends it)\" >&2; exit 1; fi; \
rm -f $remote_status; if [ -f $remote_log ]; then mv -f $remote_log $remote_log.prev; fi; \
nohup setsid bash -c $(quote "$train") > $remote_log 2>&1 < /dev/null & echo \$! > $remote_pid; \
echo \"started on \$(hostname); output in $remote_log\""
}
logs() {
  on_workers "$worker" "pid=\$(cat $remote_pid 2>/dev/null); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then tail -n +1 --pid=\"\$pid\" -f $remote_log; \
else cat $remote_log; fi; echo \"# run on \$(hostname): \$(cat $remote_status 2>/dev/null || echo 'not ended')\""
}
stop() {  # (a worker with no run going, or whose run is just ending, has nothing to stop)
  on_all_workers "pid=\$(cat $remote_pid 2>/dev/null); \
if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null && pkill -TERM -P \"\$pid\"; then \
echo \"sent SIGTERM to the run on \$(hostname); it saves a checkpoint and exits\"; \
else echo \"tpu_vm.sh: no run is going on \$(hostname), so there is nothing to stop.\"; fi"
}
# The run's exit status once it has ended on every worker (the highest); a failed connection or a
# run still going: no status (return 1).
ended_status() {
  local out
  out=$(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
        --command="cat $remote_status 2>/dev/null || echo running") || return 1
  [[ "$out" != *running* && "$out" =~ [0-9] ]] || return 1
  printf '%s\n' "$out" | grep -Eo '^[0-9]+' | sort -n | tail -n 1
}
delete() {
  do_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

[[ $dry_run == 0 ]] || echo "# tpu_vm.sh dry run: $action on $name ($accel in $zone)"
case "$action" in
  create|copy|install|run|logs|stop|delete) "$action" ;;
  all)
    create
    if [[ $keep == 0 && $dry_run == 0 ]]; then trap 'delete' EXIT; fi
    copy
    install
    run
    if [[ $dry_run == 1 ]]; then
      worker=0; logs
      [[ $keep == 1 ]] || delete
      exit 0
    fi
    # The run is detached: from here the slice is deleted only once the run has ended.
    trap - EXIT
    again="launch/tpu_vm.sh --name=$name --zone=$zone${project:+ --project=$project}"
    trap 'echo "tpu_vm.sh: stopped following; the run goes on. Follow it: $again logs; stop it: $again stop; then: $again delete" >&2; exit 130' INT TERM HUP
    worker=0; logs || true
    while ! status=$(ended_status); do
      if ! gcloud compute tpus tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
        echo "tpu_vm.sh: cannot reach $name; the run may go on. Follow it: $again logs; then: $again delete" >&2
        exit 1
      fi
      sleep 30   # worker 0 ended first, or the log connection dropped: wait for every worker
    done
    trap - INT TERM HUP
    echo "# tpu_vm.sh: the run ended with status $status on every worker."
    if [[ $keep == 0 ]]; then delete; fi
    exit "$status"
    ;;
esac
