#!/usr/bin/env bash
# Run `jaxgrpo train CONFIG [overrides]` on every worker of a Cloud TPU VM slice, detached.
#
# Usage:
#   scripts/tpu_pod_launch.sh [--dry-run] launch TPU_NAME ZONE CONFIG [key=value ...]
#   scripts/tpu_pod_launch.sh [--dry-run] status TPU_NAME ZONE
#   scripts/tpu_pod_launch.sh [--dry-run] logs   TPU_NAME ZONE [WORKER] [--follow]
#   scripts/tpu_pod_launch.sh [--dry-run] stop   TPU_NAME ZONE
# e.g.
#   scripts/tpu_pod_launch.sh launch my-v5p-64 us-east5-a configs/pod_v5p64_mtgrpo_3task.yaml \
#     model.path=/mnt/models/Qwen2.5-3B train.workdir=gs://my-bucket/run1
#
# launch (run from the repository root), on every worker at once through
# `gcloud compute tpus tpu-vm ssh --worker=all`:
#   1. copies this repository (a tarball of the current directory) to ~/jaxgrpo;
#   2. makes ~/jaxgrpo-venv with Python >= 3.11: `uv` (installed with pip) uses the image's
#      python3 when it is new enough and otherwise installs a managed 3.11 (stock TPU VM images
#      ship 3.10); then installs jaxgrpo with the extras a pod run needs: tasks
#      (reasoning-gym, math-verify), gcs (gs:// paths) and tpu (libtpu);
#   3. starts `jaxgrpo train CONFIG ... --resume auto` detached (setsid nohup), output in
#      ~/jaxgrpo-logs/train.log, its pid in ~/jaxgrpo-logs/train.pid. `--resume auto` makes the
#      same launch command continue a run after a preemption (it starts fresh when there is no
#      checkpoint yet). jax.distributed reads the coordinator, process count and index from the
#      TPU VM metadata: no per-worker flags.
# status: on every worker, whether the run is alive, and the last lines of its log.
# logs:   the log of one worker (default 0, the one that prints progress); --follow tails it.
# stop:   SIGTERM to every worker's run: each finishes its current step, saves a checkpoint of
#         it and exits 0; `launch` with the same arguments resumes it.
#
# The run's files must be storage every worker sees: train.workdir (or checkpoint.dir) must be a
# gs:// URI, in the config or an override; launch refuses otherwise.
# --dry-run prints every command (gcloud calls included, one per line, prefixed with "+ ") and
# runs none of them.
# Environment: JAXGRPO_SETUP=0 skips steps 1-2 (already installed); TPU_PROJECT picks the GCP
# project (default: gcloud's); EXTRA_ENV adds "K=V K2=V2" to every worker's environment.
set -euo pipefail

usage() {
  echo "usage:" >&2
  sed -n '5,8p' "$0" | sed 's/^# */  /' >&2
  exit 2
}

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
VERB=${1:-}
case "$VERB" in
  launch | status | logs | stop) shift ;;
  *) usage ;;
esac
[[ $# -ge 2 ]] || usage
TPU_NAME=$1
ZONE=$2
shift 2

PROJECT_FLAG=()
if [[ -n "${TPU_PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project "$TPU_PROJECT")
fi
LOG_DIR='~/jaxgrpo-logs'
VENV='~/jaxgrpo-venv'

# Run a command, or with --dry-run print it (shell-quoted) and do nothing.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

ssh_workers() {  # ssh_workers WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker="$1" --command "$2"
}

case "$VERB" in
  status)
    ssh_workers all "if [ -f $LOG_DIR/train.pid ] && kill -0 \$(cat $LOG_DIR/train.pid) 2>/dev/null; \
then echo \"\$(hostname): running (pid \$(cat $LOG_DIR/train.pid))\"; \
else echo \"\$(hostname): not running\"; fi; tail -n 3 $LOG_DIR/train.log 2>/dev/null || true"
    exit 0
    ;;
  logs)
    WORKER=0
    FOLLOW=""
    for arg in "$@"; do
      case "$arg" in
        --follow | -f) FOLLOW="-f" ;;
        *) WORKER=$arg ;;
      esac
    done
    ssh_workers "$WORKER" "tail -n 200 $FOLLOW $LOG_DIR/train.log"
    exit 0
    ;;
  stop)
    ssh_workers all "if [ -f $LOG_DIR/train.pid ] && kill -0 \$(cat $LOG_DIR/train.pid) 2>/dev/null; \
then kill -TERM \$(cat $LOG_DIR/train.pid); echo \"\$(hostname): SIGTERM sent, saving a checkpoint\"; \
else echo \"\$(hostname): not running\"; fi"
    exit 0
    ;;
esac

# ---- launch -------------------------------------------------------------------------------------
if [[ $# -lt 1 ]]; then
  usage
fi
CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
  echo "error: config file '$CONFIG' not found (run from the repository root)" >&2
  exit 2
fi
# Every worker writes its checkpoint shards, and worker 0 its logs, into one directory.
shared=0
for arg in "$@"; do
  if [[ "$arg" =~ ^(train\.workdir|checkpoint\.dir)=gs:// ]]; then
    shared=1
  fi
done
if [[ "$shared" == "0" ]] && grep -Eq '^[[:space:]]+(workdir|dir):[[:space:]]*gs://' "$CONFIG"; then
  shared=1
fi
if [[ "$shared" == "0" ]]; then
  echo "error: set train.workdir=gs://BUCKET/RUN (or checkpoint.dir=gs://...): every worker" \
    "writes its checkpoint shards there" >&2
  exit 2
fi

SETUP=${JAXGRPO_SETUP:-1}
EXTRA_ENV=${EXTRA_ENV:-}
# Quote every override for the remote shell.
OVERRIDES=""
for arg in "$@"; do
  OVERRIDES+=" $(printf '%q' "$arg")"
done

if [[ "$SETUP" == "1" ]]; then
  TARBALL="${TMPDIR:-/tmp}/jaxgrpo-${TPU_NAME}.tar.gz"
  if [[ "$DRY_RUN" == "0" ]]; then
    trap 'rm -f "$TARBALL"' EXIT
  fi
  run tar --exclude=.git --exclude=.venv --exclude=runs --exclude='*.pyc' -czf "$TARBALL" .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:/tmp/jaxgrpo.tar.gz" --zone "$ZONE" \
    "${PROJECT_FLAG[@]}" --worker=all
  ssh_workers all "set -e; rm -rf ~/jaxgrpo && mkdir -p ~/jaxgrpo && \
tar -xzf /tmp/jaxgrpo.tar.gz -C ~/jaxgrpo; \
python3 -m pip --version >/dev/null 2>&1 || sudo apt-get install -y -q python3-pip; \
python3 -m pip install -q --user --upgrade uv; \
~/.local/bin/uv venv -q --allow-existing --python '>=3.11' $VENV; \
~/.local/bin/uv pip install -q --python $VENV/bin/python -e ~/jaxgrpo'[tasks,gcs,tpu]'; \
$VENV/bin/python -c 'import sys, jax, jaxgrpo, reasoning_gym; \
print(sys.version.split()[0], jax.__version__, jax.devices()[0].device_kind)'"
fi

# One process per worker drives its local chips; XLA partitions over the global mesh.
REMOTE_ENV="TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=1 ${EXTRA_ENV}"
ssh_workers all "set -e; mkdir -p $LOG_DIR; \
if [ -f $LOG_DIR/train.pid ] && kill -0 \$(cat $LOG_DIR/train.pid) 2>/dev/null; then \
echo \"\$(hostname): a run is already going (pid \$(cat $LOG_DIR/train.pid)): stop it first\" >&2; \
exit 1; fi; \
cd ~/jaxgrpo && setsid nohup env ${REMOTE_ENV} $VENV/bin/jaxgrpo train \
$(printf '%q' "$CONFIG")${OVERRIDES} --resume auto >>$LOG_DIR/train.log 2>&1 </dev/null & \
echo \$! >$LOG_DIR/train.pid; echo \"\$(hostname): started (pid \$!), log $LOG_DIR/train.log\""
if [[ "$DRY_RUN" == "0" ]]; then
  echo "started on every worker of $TPU_NAME; watch with: $0 logs $TPU_NAME $ZONE --follow" >&2
fi
