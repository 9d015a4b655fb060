# One image recipe for every Python service of the stack (reward-ocr, reward-unified, eval-unigenbench):
# proto/ + common[server] + the service package in a venv, run as a non-root user, no pip at run time.
# Build context: the repository root. Build arguments pick the service:
#
#   docker build -f docker/service.Dockerfile --build-arg SERVICE_DIR=reward-ocr --build-arg MODULE=reward_ocr \
#       --build-arg HTTP_PORT=18082 --build-arg GRPC_PORT=50051 \
#       --build-arg IMPORT_CHECK='rapidocr, onnxruntime, cv2, reward_ocr' -t deepgen/reward-ocr:0.1.0 .
#   docker build -f docker/service.Dockerfile --build-arg SERVICE_DIR=reward-unified --build-arg MODULE=reward_unified \
#       --build-arg HTTP_PORT=18087 --build-arg GRPC_PORT=50052 -t deepgen/reward-unified:0.1.0 .
#   docker build -f docker/service.Dockerfile --build-arg SERVICE_DIR=eval-unigenbench \
#       --build-arg MODULE=eval_unigenbench --build-arg HTTP_PORT=8000 --build-arg GRPC_PORT=50053 \
#       -t deepgen/eval-unigenbench:0.1.0 .
# or `docker-compose build <service>` (docker-compose.yml passes these arguments).
#
# Build arguments:
#   SERVICE_DIR    folder of the service package in the repository (reward-ocr, reward-unified, ...).
#   MODULE         its import name; the container runs `python -m $MODULE`.
#   PIP_EXTRAS     optional extras of the service package, e.g. "[paddle]" (brackets included).
#   IMPORT_CHECK   modules imported at build time, so a broken wheel fails the build, not the first
#                  request (default: the transport stack and MODULE).
#   WRITABLE_DIRS  optional: space-separated folders the service writes (eval-unigenbench: /data/results),
#                  created owned by the service user, so that a named volume mounted there starts
#                  writable (Docker copies the folder's owner into a new volume).
#   HTTP_PORT / GRPC_PORT  the service's default ports (env defaults in the image, EXPOSEd, probed by
#                  the HEALTHCHECK); the environment can still override them at run time.
#   BASE_IMAGE     any Debian-based image; python3 (>= 3.11) + venv come from apt when the base lacks
#                  them, so a bare Debian base works too (the tests use local/debian:bookworm).
#   PIP_CA_BUNDLE  optional: path, inside the build context, of a PEM bundle pip must trust (a
#                  TLS-intercepting proxy). Empty (default): pip's own CA store. Used only while
#                  installing; it does not reach the final image.
#
# Nothing here needs extra system libraries: RapidOCR's OpenCV comes as opencv-python-headless (no
# libGL), and the judge adapters are plain Python (no torch: the judge models run in vLLM).
# Judge templates and benchmark files are data, not part of the image: mount them read-only at
# TEMPLATES_DIR / UNIGENBENCH_DATA_DIR (docker-compose.yml mounts ${JUDGE_DATA_DIR}; `make
# fetch-judge-data` downloads them).
#
# GPU variant of reward-ocr (PaddleOCR on paddlepaddle-gpu; not built here, there is no GPU): use a
# CUDA base with cuDNN, PIP_EXTRAS="[paddle]", and add the paddlepaddle-gpu wheel matching its CUDA
# version in the build stage, e.g.
#   BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 (any CUDA base Paddle supports), then
#     pip install paddlepaddle-gpu==3.2.0 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/
#   and run with OCR_BACKEND=paddleocr OCR_USE_GPU=true (PaddleOCR is not thread-safe: keep
#   OCR_EXECUTOR=process), giving the service a GPU in compose (deploy.resources.reservations.devices).
#   PaddleOCR downloads its models on first use: mount a volume at the user's ~/.paddlex to keep them.

ARG BASE_IMAGE=python:3.11-slim

# --- python: the base plus a python3 interpreter (from apt when the base has none) ----------------
FROM ${BASE_IMAGE} AS python
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# --- build: install proto, common[server] and the service into a venv ----------------------------
FROM python AS build
RUN set -eu; \
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv; \
        apt-get clean; rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv
ARG SERVICE_DIR
ARG MODULE
ARG PIP_EXTRAS=""
ARG IMPORT_CHECK=""
ARG PIP_CA_BUNDLE=""
# COPY needs a source that exists: without a bundle this copies the (unused) root pyproject instead.
COPY ${PIP_CA_BUNDLE:-pyproject.toml} /tmp/pip-ca.pem
COPY proto/ /src/proto/
COPY common/ /src/common/
COPY ${SERVICE_DIR}/ /src/service/
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN set -eu; \
    test -n "$SERVICE_DIR" && test -n "$MODULE" || { echo "build args SERVICE_DIR and MODULE are required" >&2; exit 1; }; \
    if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT=/tmp/pip-ca.pem; fi; \
    /opt/venv/bin/pip install /src/proto '/src/common[server]' "/src/service${PIP_EXTRAS}"; \
    /opt/venv/bin/python -c "import grpc, fastapi, uvicorn, ${IMPORT_CHECK:-$MODULE}"; \
    /opt/venv/bin/pip uninstall --yes --quiet pip setuptools; \
    rm -f /tmp/pip-ca.pem

# --- runtime: the interpreter and the venv (without pip: nothing installs at run time) ------------
FROM python AS runtime
COPY --from=build /opt/venv /opt/venv
ARG WRITABLE_DIRS=""
RUN set -eu; \
    useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin service; \
    for dir in $WRITABLE_DIRS; do install -d -o service -g service "$dir"; done
USER service
WORKDIR /home/service
ARG MODULE
ARG HTTP_PORT=8000
ARG GRPC_PORT=50051
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVICE_MODULE=${MODULE} \
    HTTP_PORT=${HTTP_PORT} \
    GRPC_PORT=${GRPC_PORT}
EXPOSE ${HTTP_PORT} ${GRPC_PORT}
# Healthy only when /readyz answers 200 (models or benchmark loaded; for the judge adapters also the
# judge's /health answering 200): urlopen raises on a refused connection, a timeout and any non-2xx
# status (503 while loading or while the judge is down), and python then exits 1. The start period
# covers model loading (HEALTHCHECK flags take no build arguments, so it is one value for all).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "deepgen_common.probe"]
# `exec`: the shell replaces itself with python, which then receives SIGTERM directly (from tini under
# compose's `init: true`) for the graceful stop.
CMD ["sh", "-c", "exec python -m \"$SERVICE_MODULE\""]
