#!/usr/bin/env bash
# Launch MR-GRPO training on this node under torchrun: `python -m deepgen_trainer.train` once per GPU.
# The trainer image's entrypoint, and `make train-local` (with .venv/bin first on PATH). Every argument
# is passed on to the trainer (`scripts/train.sh --model tiny --max_steps 2`).
#
# Env (defaults: one node, every GPU this process sees):
#   NNODES       nodes in the job (1)
#   NODE_RANK    this node's rank, 0 .. NNODES-1 (0)
#   MASTER_ADDR  address of the rank-0 node, reachable from every node (127.0.0.1)
#   MASTER_PORT  its rendezvous port (29500)
#   NGPUS        processes on this node: a number, or `all` / empty for every visible GPU (1 without GPUs)
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NGPUS="${NGPUS:-all}"

die() {
	echo "train.sh: $*" >&2
	exit 2
}

if [[ "$NGPUS" == all ]]; then
	# What torch sees (CUDA_VISIBLE_DEVICES / the container's devices); one CPU process without a GPU.
	NGPUS="$(python -c 'import torch; print(torch.cuda.device_count() or 1)')" ||
		die "cannot count the GPUs (is torch installed in $(command -v python)?); set NGPUS"
fi
for var in NNODES NODE_RANK MASTER_PORT NGPUS; do
	[[ "${!var}" =~ ^[0-9]+$ ]] || die "$var must be a non-negative integer, got '${!var}'"
done
((NGPUS >= 1 && NNODES >= 1)) || die "NGPUS and NNODES must be >= 1"
((NODE_RANK < NNODES)) || die "NODE_RANK $NODE_RANK must be below NNODES $NNODES"

echo "train.sh: node $NODE_RANK of $NNODES, $NGPUS process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
# exec: torchrun replaces the shell and receives SIGTERM directly (from tini under compose's init).
exec torchrun \
	--nnodes "$NNODES" \
	--node_rank "$NODE_RANK" \
	--nproc_per_node "$NGPUS" \
	--master_addr "$MASTER_ADDR" \
	--master_port "$MASTER_PORT" \
	-m deepgen_trainer.train "$@"
