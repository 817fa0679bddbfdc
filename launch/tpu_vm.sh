#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, copy this checkout to every worker, install, run the
# same command on every worker (jax.distributed finds the slice by itself), delete it.
#
# Usage:
#   launch/tpu_vm.sh [options] ACTION [-- MAIN_ARGS...]
#
#   ACTION   create | copy | install | run | delete | all (= create, copy, install, run, delete;
#            the slice is deleted even when the run fails, unless --keep)
#   --name NAME               TPU name (default: $TPU_NAME, else imgcls-$USER)
#   --zone ZONE               zone (default: $ZONE; required), e.g. us-central2-b
#   --project PROJECT         project (default: $PROJECT_ID, else gcloud's default)
#   --accelerator-type TYPE   e.g. v4-8 (one host), v4-32 (4 hosts) (default: $ACCELERATOR_TYPE, else v4-8)
#   --version VERSION         TPU software version (default: $RUNTIME_VERSION, else tpu-ubuntu2204-base)
#   --spot                    create a Spot TPU (cheaper, may be preempted)
#   --keep                    with `all`: do not delete the slice at the end
#   --dry-run                 print the exact commands and exit
#   MAIN_ARGS                 passed to `python -m imgcls_jax.main` on every worker, e.g.
#                             --config=configs/imagenet_resnet50.py --workdir=/mnt/shared/run1
#                             --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
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
accel="${ACCELERATOR_TYPE:-v4-8}" version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
spot=0 keep=0 dry_run=0 action=''
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
remote_dir='~/imgcls_jax' remote_venv='~/imgcls_venv'
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in  # --opt=value is --opt value
    --name=*|--zone=*|--project=*|--accelerator-type=*|--version=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case "$1" in
    --name) name="${2:?}"; shift 2 ;;
    --zone) zone="${2:?}"; shift 2 ;;
    --project) project="${2:?}"; shift 2 ;;
    --accelerator-type) accel="${2:?}"; shift 2 ;;
    --version) version="${2:?}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    create|copy|install|run|delete|all) action="$1"; shift ;;
    *) die "unknown argument '$1' (see --help)." ;;
  esac
done
main_args=("$@")
[[ -n "$action" ]] || die "give an ACTION: create, copy, install, run, delete or all (see --help)."
[[ -n "$zone" ]] || die "give --zone (or set ZONE), e.g. --zone=us-central2-b."
if [[ "$action" == run || "$action" == all ]] && [[ ${#main_args[@]} -eq 0 ]]; then
  die "no arguments for imgcls_jax.main after --; e.g. -- --config=configs/default.py --workdir=/mnt/shared/run1"
fi

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
tarball="/tmp/imgcls_jax-$name.tgz"

# Runs (or, in a dry run, prints) one command.
do_cmd() {
  if [[ $dry_run == 1 ]]; then quote "$@"; echo; else "$@"; fi
}
on_all_workers() {
  do_cmd gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  [[ $spot == 0 ]] || extra+=(--spot)
  do_cmd gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accel" \
    --version="$version" "${extra[@]}"
}
copy() {
  do_cmd tar -czf "$tarball" --exclude=.git --exclude=venv --exclude=.venv --exclude='*.egg-info' \
    --exclude=__pycache__ -C "$repo" .
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
  on_all_workers "cd $remote_dir && $remote_venv/bin/python -m imgcls_jax.main $(quote "${main_args[@]}") --config.distributed.enabled=True"
}
delete() {
  do_cmd gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
}

[[ $dry_run == 0 ]] || echo "# tpu_vm.sh dry run: $action on $name ($accel in $zone)"
case "$action" in
  create|copy|install|run|delete) "$action" ;;
  all)
    create
    if [[ $keep == 0 && $dry_run == 0 ]]; then trap 'delete' EXIT; fi
    copy
    install
    run
    if [[ $keep == 0 && $dry_run == 1 ]]; then delete; fi
    ;;
esac
