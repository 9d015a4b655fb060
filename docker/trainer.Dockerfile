# The GPU training image: proto/ + common (client side) + trainer[parquet,tracking] in a venv
# on top of a CUDA PyTorch base, run as a non-root user; the entrypoint scripts/train.sh starts
# `torchrun -m deepgen_trainer.train` with the node layout from NNODES / NODE_RANK / MASTER_ADDR /
# MASTER_PORT / NGPUS and passes its arguments on to the trainer. Build context: the repository root.
#
#   docker build -f docker/trainer.Dockerfile -t deepgen/trainer:0.1.0 .
#   docker run --rm --gpus all --shm-size 32g -v /data/models:/models:ro deepgen/trainer:0.1.0 --max_steps 100
# or `docker compose --profile train build trainer` / `make train` (docker-compose.yml passes the args).
#
# Build arguments:
#   BASE_IMAGE      default: NVIDIA's CUDA 12.8 + cuDNN runtime on Ubuntu 24.04, without torch: torch,
#                   transformers, diffusers, DeepSpeed and peft are installed at the versions the test suite
#                   runs (docker/trainer-pins.txt: torch 2.13.0, transformers 5.25.0, diffusers 0.42.1,
#                   DeepSpeed 0.19.8, peft 0.21.2), not whatever a PyTorch base image ships. Any
#                   Debian/Ubuntu-based image works: python3 (>= 3.11) + venv come from apt when the base
#                   lacks them (the tests build on local/debian:bookworm with a CPU wheel; see
#                   TORCH_REQUIREMENT / WHEELS_DIR). The venv sees the base's packages
#                   (--system-site-packages): a base that has torch must have the pinned version, else the
#                   build stops (set TORCH_REQUIREMENT=torch==<its version> to accept an untested torch).
#                   DeepSpeed's JIT-compiled ops (fused Adam, CPU Adam of zero3_offload) need a compiler:
#                   use the matching `-devel` base for those.
#   TORCH_REQUIREMENT  the torch pip installs when the base has none, and the version a base's torch must
#                   have (default torch==2.13.0, docker/trainer-pins.txt's: the CUDA build from PyPI on
#                   x86_64 Linux; a CPU-only image gets its CPU wheel from WHEELS_DIR).
#   WHEELS_DIR      optional: folder inside the build context with extra wheels pip may use (pip
#                   --find-links), e.g. build/wheels holding a CPU torch wheel. Empty (default): none.
#   TRAINER_EXTRAS  extras of the trainer package (default [parquet,tracking]: parquet prompt files, wandb
#                   and swanlab).
#   EXTRA_PACKAGES  more pip requirements (default none).
#   PIP_CA_BUNDLE   optional: path, inside the build context, of a PEM bundle pip must trust (a
#                   TLS-intercepting proxy); used while installing only, it does not reach the final image.
#
# The trainer is installed editable from /opt/deepgen/trainer (read-only, owned by root): the named
# DeepSpeed configs (--deepspeed zero2|zero3|zero3_offload|zero3_sd3) are read from its deepspeed/
# folder next to the sources. Model weights, data and outputs are not part of the image: compose mounts
# them at /models (read-only), /data/train (read-only) and /outputs (see docker-compose.yml).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- python: the base plus a python3 interpreter (from apt when the base has none) ----------------
FROM ${BASE_IMAGE} AS python
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# --- build: a venv over the base's packages with proto, common, torch (if missing) and the trainer --
FROM python AS build
RUN set -eu; \
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv --system-site-packages /opt/venv
ARG PIP_CA_BUNDLE=""
ARG WHEELS_DIR=""
ARG TORCH_REQUIREMENT=torch==2.13.0
# COPY needs sources that exist: without a bundle / wheel folder these copy unused stand-ins instead.
COPY ${PIP_CA_BUNDLE:-pyproject.toml} /tmp/pip-ca.pem
COPY ${WHEELS_DIR:-proto/deepgen} /tmp/wheels/
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer (the largest, and independent of the sources below).
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT=/tmp/pip-ca.pem; fi; \
    if [ -n "$WHEELS_DIR" ]; then export PIP_FIND_LINKS=/tmp/wheels; fi; \
    if /opt/venv/bin/python -c 'import torch' >/dev/null 2>&1; then \
        have="torch==$(/opt/venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"; \
        if [ "$have" != "$TORCH_REQUIREMENT" ]; then \
            echo "the base image has $have, the tests run $TORCH_REQUIREMENT: use a base without torch" \
                "(the default) or pass --build-arg TORCH_REQUIREMENT=$have to accept it untested" >&2; exit 1; \
        fi; \
        echo "torch from the base image: $have"; \
    else \
        /opt/venv/bin/pip install "$TORCH_REQUIREMENT"; \
    fi; \
    /opt/venv/bin/python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/torch-constraint.txt
COPY docker/trainer-pins.txt /tmp/trainer-pins.txt
COPY proto/ /src/proto/
COPY common/ /src/common/
COPY trainer/ /opt/deepgen/trainer/
COPY scripts/train.sh /opt/deepgen/scripts/train.sh
ARG TRAINER_EXTRAS="[parquet,tracking]"
ARG EXTRA_PACKAGES=""
RUN set -eu; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT=/tmp/pip-ca.pem; fi; \
    if [ -n "$WHEELS_DIR" ]; then export PIP_FIND_LINKS=/tmp/wheels; fi; \
    grep -v '^torch==' /tmp/trainer-pins.txt >> /tmp/torch-constraint.txt; \
    /opt/venv/bin/pip install --constraint /tmp/torch-constraint.txt \
        /src/proto /src/common --editable "/opt/deepgen/trainer${TRAINER_EXTRAS}" $EXTRA_PACKAGES; \
    /opt/venv/bin/python -c 'import torch, transformers, diffusers, peft, deepspeed, deepgen_common.client, deepgen_trainer.train, deepgen_trainer.convert'; \
    /opt/venv/bin/python -c 'import sys; from deepgen_trainer.observe.cjk_font import package_font; sys.exit(package_font() is None)'; \
    /opt/venv/bin/python -c 'from deepgen_trainer.config import DEEPSPEED_CONFIG_NAMES, deepspeed_config_path as p; [p(n) for n in DEEPSPEED_CONFIG_NAMES]'; \
    rm -rf /tmp/pip-ca.pem /tmp/wheels /src

# --- runtime: the base's interpreter, the venv and the trainer sources ------------------------------
FROM python AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/deepgen /opt/deepgen
# Folders the trainer writes, owned by its user: a named volume mounted there starts writable (Docker
# copies the folder's owner into a new volume). The CJK font of the contact sheets is a pip dependency
# of the trainer (noto-cjk-sans-otc), found through its package as on the host.
RUN set -eu; \
    useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin trainer; \
    install -d -o trainer -g trainer /outputs /home/trainer/.cache /home/trainer/.cache/huggingface
USER trainer
WORKDIR /home/trainer
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/trainer/.cache/huggingface \
    OUTPUT_DIR=/outputs \
    WANDB_MODE=offline \
    SWANLAB_MODE=offline
# Prometheus endpoint of the trainer (rank 0) when METRICS_PORT / --metrics_port is set (compose: 9400).
EXPOSE 9400
ENTRYPOINT ["/opt/deepgen/scripts/train.sh"]
CMD []
