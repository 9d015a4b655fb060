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

# The GPUs of the compose stack (docker-compose.yml passes them): the trainer and a judge of this stack
# (a *_URL naming its compose service) must not share a GPU: the judge's vLLM claims UNIFIEDREWARD_GPU_UTIL
# of it, and whichever starts second fails. The two judges may share GPUs in sleep mode only
# (docker-compose.sleep.yml sets JUDGES_SLEEP_MODE=true).
shared_gpus() { # shared_gpus LIST LIST: the entries of two comma-separated GPU lists found in both
	local -a a b
	local x y out=""
	IFS=, read -ra a <<<"${1// /}"
	IFS=, read -ra b <<<"${2// /}"
	for x in "${a[@]}"; do
		for y in "${b[@]}"; do
			[[ -n "$x" && "$x" == "$y" ]] && out+="${out:+,}$x"
		done
	done
	echo "$out"
}
check_gpu_layout() {
	local -a names=()
	[[ -n "${TRAINER_GPUS:-}" ]] && names+=(TRAINER_GPUS)
	[[ -n "${UNIFIEDREWARD_GPUS:-}" && "${UNIFIEDREWARD_THINK_URL:-}" == *//reward-unified:* ]] && names+=(UNIFIEDREWARD_GPUS)
	[[ -n "${UNIGENBENCH_GPUS:-}" && "${UNIGENBENCH_API_URL:-}" == *//eval-unigenbench:* ]] && names+=(UNIGENBENCH_GPUS)
	local i j shared
	for ((i = 0; i < ${#names[@]}; i++)); do
		for ((j = i + 1; j < ${#names[@]}; j++)); do
			[[ "${names[i]}${names[j]}" == UNIFIEDREWARD_GPUSUNIGENBENCH_GPUS && "${JUDGES_SLEEP_MODE:-}" == true ]] && continue
			shared="$(shared_gpus "${!names[i]}" "${!names[j]}")"
			[[ -z "$shared" ]] || die "GPU clash: ${names[i]}=${!names[i]} and ${names[j]}=${!names[j]} share GPU $shared; give each its own GPUs in .env (defaults: TRAINER_GPUS=0, UNIFIEDREWARD_GPUS=1, UNIGENBENCH_GPUS=2,3), or point the judge's *_URL elsewhere when it does not run in this stack"
		done
	done
}
check_gpu_layout

echo "train.sh: node $NODE_RANK of $NNODES, $NGPUS process(es), master $MASTER_ADDR:$MASTER_PORT" >&2
# exec: torchrun replaces the shell and receives SIGTERM directly (from tini under compose's init).
exec torchrun \
	--nnodes "$NNODES" \
	--node_rank "$NODE_RANK" \
	--nproc_per_node "$NGPUS" \
	--master_addr "$MASTER_ADDR" \
	--master_port "$MASTER_PORT" \
	-m deepgen_trainer.train "$@"
