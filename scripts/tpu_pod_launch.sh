#!/usr/bin/env bash
# Launch `jaxgrpo train CONFIG [overrides]` on every worker of a Cloud TPU VM slice.
#
# Usage: scripts/tpu_pod_launch.sh TPU_NAME ZONE CONFIG [key=value ...]
#   e.g. scripts/tpu_pod_launch.sh my-v5p-64 us-east5-a configs/pod_v5p64_mtgrpo_3task.yaml \
#          model.path=/mnt/models/Qwen2.5-3B checkpoint.dir=gs://my-bucket/run1/checkpoints
#
# What runs on each worker (all at once, via `gcloud compute tpus tpu-vm ssh --worker=all`):
#   1. copy of this repository (the current directory, as a tarball) into ~/jaxgrpo;
#   2. `pip install -e ~/jaxgrpo[gcs] jax[tpu]` into ~/jaxgrpo-venv (libtpu from its release index);
#   3. `jaxgrpo train CONFIG ...` with the environment below. jax.distributed.initialize()
#      reads the coordinator, process count and process index from the TPU VM metadata, so no
#      per-worker flags are needed; process 0 writes logs, every worker writes its checkpoint
#      shards (put checkpoint.dir on gs:// so that all workers see one directory).
# Environment: JAXGRPO_SETUP=0 skips steps 1-2 (already installed); TPU_PROJECT picks the GCP
# project (default: gcloud's); EXTRA_ENV adds "K=V K2=V2" to every worker's environment.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
shift 3
if [[ ! -f "$CONFIG" ]]; then
  echo "error: config file '$CONFIG' not found (run from the repository root)" >&2
  exit 2
fi

PROJECT_FLAG=()
if [[ -n "${TPU_PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project "$TPU_PROJECT")
fi
SETUP=${JAXGRPO_SETUP:-1}
EXTRA_ENV=${EXTRA_ENV:-}

# Quote every override for the remote shell.
OVERRIDES=""
for arg in "$@"; do
  OVERRIDES+=" $(printf '%q' "$arg")"
done

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

if [[ "$SETUP" == "1" ]]; then
  TARBALL=$(mktemp /tmp/jaxgrpo.XXXXXX.tar.gz)
  trap 'rm -f "$TARBALL"' EXIT
  tar --exclude=.git --exclude=runs --exclude='*.pyc' -czf "$TARBALL" .
  gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:/tmp/jaxgrpo.tar.gz" --zone "$ZONE" \
    "${PROJECT_FLAG[@]}" --worker=all
  ssh_all "set -e; mkdir -p ~/jaxgrpo && tar -xzf /tmp/jaxgrpo.tar.gz -C ~/jaxgrpo && \
python3 -m venv ~/jaxgrpo-venv && ~/jaxgrpo-venv/bin/pip install -q --upgrade pip && \
~/jaxgrpo-venv/bin/pip install -q -e ~/jaxgrpo'[gcs]' \
'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
fi

# One process per worker drives its 4 local chips; XLA partitions over the global mesh.
REMOTE_ENV="TOKENIZERS_PARALLELISM=false TF_CPP_MIN_LOG_LEVEL=1 ${EXTRA_ENV}"
ssh_all "cd ~/jaxgrpo && env ${REMOTE_ENV} ~/jaxgrpo-venv/bin/jaxgrpo train \
$(printf '%q' "$CONFIG")${OVERRIDES} 2>&1 | tee -a ~/jaxgrpo-train.log"
