"""Step metrics of the trainer: wandb, swanlab and a Prometheus endpoint.

`Tracker.log` takes one flat dict of scalars per step (``reward/ocr/mean``, ``time/step``, ``lr``…)
and sends it to each configured backend; `Tracker.log_images` sends image files (the evaluation's
contact sheets) to wandb and swanlab as images (Prometheus has no images):
- ``wandb`` / ``swanlab``: a run under ``output_dir``; offline by default (the caller's settings
  read ``WANDB_MODE`` / ``SWANLAB_MODE`` and pass the mode in). Both are optional dependencies,
  imported only when requested.
- ``none``: nothing (``report_to none``).
- Prometheus (independent of the above, when a port is given): one labelled gauge
  ``deepgen_trainer_metric{name="reward/ocr/mean"}`` holding each metric's latest value, the
  ``deepgen_trainer_step`` gauge and the ``deepgen_trainer_steps_total`` counter, served over HTTP
  by ``prometheus_client.start_http_server``. The label keeps the original names (no lossy
  sanitising) and the number of series is bounded by ``max_prometheus_series``.

Only rank 0 reports: on every other rank the tracker is a no-op and imports nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from torch import Tensor

log = logging.getLogger(__name__)

TrackerBackend = Literal["wandb", "swanlab", "none"]
TRACKER_BACKENDS: tuple[str, ...] = get_args(TrackerBackend)

Scalar = float | int | Tensor
"""A Python number or a one-element tensor."""


class _Run(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, images: dict[str, Path], step: int) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """Sends each step's scalar metrics to the configured backends (rank 0 only).

    Args:
        report_to: backends among ``TRACKER_BACKENDS``; ``none`` alone (or an empty list) disables
            wandb and swanlab.
        output_dir: run directories are written under it (``wandb/``, ``swanlog/``).
        project, run_name: names of the run in wandb / swanlab (``swanlab_project``: swanlab's project,
            default ``project``).
        config: the resolved run config, stored with the run.
        wandb_mode: ``offline`` (default), ``online`` or ``disabled`` (no run: nothing written).
        swanlab_mode: ``offline`` (default), ``local``, ``online`` or ``disabled`` (no run: nothing written).
        prometheus_port: serve ``/metrics`` on this port (0 = any free port, see
            ``prometheus_port`` after construction); None = no endpoint.
        prometheus_addr: address the endpoint binds.
        rank: the process's global rank; every rank but 0 gets a no-op tracker.
        max_prometheus_series: metric names beyond this many are not exported (logged once).
    """

    def __init__(
        self,
        report_to: Sequence[str] = ("none",),
        *,
        output_dir: str | Path = ".",
        project: str = "deepgen-rl",
        run_name: str | None = None,
        swanlab_project: str | None = None,
        config: Mapping[str, Any] | None = None,
        wandb_mode: str = "offline",
        swanlab_mode: str = "offline",
        prometheus_port: int | None = None,
        prometheus_addr: str = "0.0.0.0",
        rank: int = 0,
        max_prometheus_series: int = 512,
    ) -> None:
        unknown = [b for b in report_to if b not in TRACKER_BACKENDS]
        if unknown:
            raise ValueError(f"unknown tracker backends {unknown}; valid: {', '.join(TRACKER_BACKENDS)}")
        if "none" in report_to and len(set(report_to)) > 1:
            raise ValueError(f"report_to {list(report_to)} mixes 'none' with backends; pass 'none' alone")
        self.enabled = rank == 0
        self.prometheus_port: int | None = None
        self.registry = CollectorRegistry()
        self._runs: list[_Run] = []
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._max_series = max_prometheus_series
        self._dropped_logged = False
        self._metric = Gauge(
            "deepgen_trainer_metric", "Latest value of each step metric, by name.", ["name"], registry=self.registry
        )
        self._step = Gauge("deepgen_trainer_step", "Global step of the latest logged metrics.", registry=self.registry)
        self._steps = Counter("deepgen_trainer_steps", "Steps logged by this process.", registry=self.registry)
        self._series: set[str] = set()
        if not self.enabled:
            return
        output_dir = Path(output_dir)
        try:
            if "wandb" in report_to and wandb_mode != "disabled":
                self._runs.append(_WandbRun(output_dir, project, run_name, config, wandb_mode))
            if "swanlab" in report_to and swanlab_mode != "disabled":
                self._runs.append(_SwanlabRun(output_dir, swanlab_project or project, run_name, config, swanlab_mode))
            if prometheus_port is not None:
                self._server, self._server_thread = start_http_server(
                    prometheus_port, addr=prometheus_addr, registry=self.registry
                )
                self.prometheus_port = self._server.server_port
                log.info("serving trainer metrics on http://%s:%d/metrics", prometheus_addr, self.prometheus_port)
        except BaseException:
            self.close()
            raise

    def log(self, metrics: Mapping[str, Scalar], step: int) -> None:
        """Record one step's metrics (NaN allowed, e.g. a reward that scored nothing)."""
        if not self.enabled:
            return
        values = {name: _to_float(name, v) for name, v in metrics.items()}
        for run in self._runs:
            run.log(values, step)
        for name, value in values.items():
            if name not in self._series and len(self._series) >= self._max_series:
                if not self._dropped_logged:
                    log.warning(
                        "more than %d metric names; %r and later new names are not exported", self._max_series, name
                    )
                    self._dropped_logged = True
                continue
            self._series.add(name)
            self._metric.labels(name=name).set(value)
        self._step.set(step)
        self._steps.inc()

    def log_images(self, images: Mapping[str, str | Path], step: int) -> None:
        """Record image files (PNG, JPEG) under their names, e.g. ``eval/en/contact_sheet``."""
        if not self.enabled:
            return
        paths = {name: Path(path) for name, path in images.items()}
        for run in self._runs:
            run.log_images(paths, step)

    def close(self) -> None:
        """Finish the runs (flushing them to disk) and stop the endpoint. Idempotent."""
        runs, self._runs = self._runs, []
        for run in runs:
            run.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_thread is not None:
            self._server_thread.join(5)
            self._server_thread = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _WandbRun:
    def __init__(
        self, output_dir: Path, project: str, run_name: str | None, config: Mapping[str, Any] | None, mode: str
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "report_to includes 'wandb' but wandb is not installed: pip install wandb, or drop it from --report_to"
            ) from None
        output_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=project, name=run_name, dir=str(output_dir), mode=mode, config=dict(config or {})
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        self._run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class _SwanlabRun:
    def __init__(
        self, output_dir: Path, project: str, run_name: str | None, config: Mapping[str, Any] | None, mode: str
    ) -> None:
        try:
            import swanlab
        except ImportError:
            raise ImportError(
                "report_to includes 'swanlab' but swanlab is not installed: pip install swanlab, or drop it from "
                "--report_to"
            ) from None
        log_dir = output_dir / "swanlog"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._swanlab = swanlab
        swanlab.init(project=project, mode=mode, config=dict(config or {}), log_dir=str(log_dir), name=run_name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._swanlab.log(metrics, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self._swanlab.log({name: self._swanlab.Image(str(path)) for name, path in images.items()}, step=step)

    def close(self) -> None:
        self._swanlab.finish()


def _to_float(name: str, value: Scalar) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)
