#!/usr/bin/env bash
# Launch MR-GRPO training on this node under torchrun: `python -m deepgen_trainer.train` once per GPU.
# The trainer image's entrypoint, and `make train-local` (with .venv/bin first on PATH). Every argument
# is passed on to the trainer (`scripts/train.sh --model tiny --max_steps 2`).
#
# Env (defaults: one node, every GPU this process sees); the original DeepGen-RL launcher's variables
# are fallbacks, so its cluster environment works unchanged:
#   NNODES       nodes in the job (else the entries of NODE_IP_LIST, comma-separated; else 1)
#   NODE_RANK    this node's rank, 0 .. NNODES-1 (else INDEX; else 0)
#   MASTER_ADDR  address of the rank-0 node, reachable from every node (else CHIEF_IP; else 127.0.0.1)
#   MASTER_PORT  its rendezvous port (29700, the original's)
#   NGPUS        processes on this node: a number, or `all` / empty for every visible GPU (1 without GPUs)
#   UNIGENBENCH_API_URL  http://localhost:8000 when not set at all (the original launcher's default)
# This node's output goes to <output dir>/logs/<node rank>.log as well (the output dir of --output_dir,
# else OUTPUT_DIR, else outputs), and the config files the run names (--model_config, --dataset_config,
# --eval_dataset_config, --sftaux_dataset_config, a --deepspeed .json, or their variables) are copied
# to <output dir>/configs/ with this script, as the original launcher did.
set -euo pipefail

original_nnodes=""
if [[ -n "${NODE_IP_LIST:-}" ]]; then
	IFS=, read -r -a node_ips <<<"$NODE_IP_LIST"
	original_nnodes="${#node_ips[@]}"
fi
NNODES="${NNODES:-${original_nnodes:-1}}"
NODE_RANK="${NODE_RANK:-${INDEX:-0}}"
MASTER_ADDR="${MASTER_ADDR:-${CHIEF_IP:-127.0.0.1}}"
MASTER_PORT="${MASTER_PORT:-29700}"
NGPUS="${NGPUS:-all}"
export UNIGENBENCH_API_URL="${UNIGENBENCH_API_URL-http://localhost:8000}"

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

# The value of a trainer flag in the arguments (--flag VALUE or --flag=VALUE), else the variable's.
flag_value() {
	local flag="$1" fallback="$2" args=("${@:3}") i
	for ((i = 0; i < ${#args[@]}; i++)); do
		case "${args[i]}" in
		"$flag") [[ $((i + 1)) -lt ${#args[@]} ]] && fallback="${args[i + 1]}" ;;
		"$flag"=*) fallback="${args[i]#*=}" ;;
		esac
	done
	printf '%s' "$fallback"
}

output_dir="$(flag_value --output_dir "${OUTPUT_DIR:-outputs}" "$@")"
mkdir -p "$output_dir/logs" "$output_dir/configs"
exec > >(tee -a "$output_dir/logs/$NODE_RANK.log") 2> >(tee -a "$output_dir/logs/$NODE_RANK.log" >&2)
for pair in --model_config:MODEL_CONFIG --dataset_config:DATASET_CONFIG --eval_dataset_config:EVAL_DATASET_CONFIG \
	--sftaux_dataset_config:SFTAUX_DATASET_CONFIG --deepspeed:; do
	flag="${pair%%:*}" var="${pair#*:}"
	file="$(flag_value "$flag" "${var:+${!var:-}}" "$@")"
	if [[ -f "$file" ]]; then cp "$file" "$output_dir/configs/"; fi
done
cp "$(realpath "$0")" "$output_dir/configs/"

echo "train.sh: node $NODE_RANK of $NNODES, $NGPUS process(es), master $MASTER_ADDR:$MASTER_PORT," \
	"log $output_dir/logs/$NODE_RANK.log" >&2
# exec: torchrun replaces the shell and receives SIGTERM directly (from tini under compose's init).
exec torchrun \
	--nnodes "$NNODES" \
	--node_rank "$NODE_RANK" \
	--nproc_per_node "$NGPUS" \
	--master_addr "$MASTER_ADDR" \
	--master_port "$MASTER_PORT" \
	-m deepgen_trainer.train "$@"
