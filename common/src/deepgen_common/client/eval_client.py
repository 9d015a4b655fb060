"""Client of the evaluation contract (`deepgen.eval.v1`) over gRPC or HTTP/JSON.

One evaluation: `prompts()` → generate `duplicates` images per prompt → `run = start_run(step)` →
`submit(run, images)` (any number of times; over gRPC one client stream per call) →
`finish(run)` → `RunSummary`. The `EvalRun` handle carries the run's secret, which the service wants
with every submission and FinishRun; it pickles, so one rank can open a run and broadcast it. Calls
that change nothing (prompts, info) and StartRun are retried on UNAVAILABLE / RESOURCE_EXHAUSTED /
transport errors; submissions and FinishRun are not (a repeated submission would be rejected as a
duplicate), so the caller decides what a failed evaluation means.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from deepgen.common.v1 import types_pb2
from deepgen.eval.v1 import eval_pb2
from deepgen_common.client.reward_client import RetryPolicy
from deepgen_common.client.transports import HttpTransport, TransientError, grpc_channel, rpc_error
from deepgen_common.convert import image_format_to_pb, info_from_pb
from deepgen_common.types import DimensionScore, ImageFormat, RunSummary, ServiceInfo

T = TypeVar("T")
_SERVICE = eval_pb2.DESCRIPTOR.services_by_name["EvalService"].full_name


@dataclass(frozen=True)
class EvalPrompts:
    """The benchmark to generate: `duplicates` images for each (prompt_id, prompt)."""

    benchmark: str
    duplicates: int
    prompts: list[tuple[str, str]]


@dataclass(frozen=True)
class EvalRun:
    """An open run: its id (what `str()` and logs show) and the secret StartRun returned with it."""

    run_id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return self.run_id


@dataclass(frozen=True)
class EvalImage:
    """Duplicate `duplicate` of prompt `prompt_id`, encoded."""

    prompt_id: str
    duplicate: int
    image: bytes
    image_format: ImageFormat = ImageFormat.PNG


class EvalClient:
    """Synchronous client of one eval service. `url`: `http://host:port` or `grpc://host:port`."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 3600.0,
        batch_size: int = 16,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        if url.startswith(("http://", "https://")):
            self._http: HttpTransport | None = HttpTransport(url)
            self._channel: grpc.Channel | None = None
        elif url.startswith(("grpc://", "dns:", "ipv4:", "ipv6:", "unix:")):
            self._http = None
            self._channel = grpc_channel(url, max_message_bytes)
        else:
            raise ValueError(f"unsupported eval service URL {url!r}: use http://host:port or grpc://host:port")

    def _retrying(self, call: Callable[[], T]) -> T:
        for attempt in range(self.retry.max_attempts):
            try:
                return call()
            except TransientError:
                if attempt + 1 == self.retry.max_attempts:
                    raise
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def _unary(self, method: str, request: object, response_type: type[T], timeout_s: float = 30.0) -> T:
        assert self._channel is not None
        stub = self._channel.unary_unary(
            f"/{_SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        try:
            return stub(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def info(self) -> ServiceInfo:
        if self._http is not None:
            return self._retrying(lambda: self._http.info(30.0))  # type: ignore[union-attr]
        return info_from_pb(
            self._retrying(lambda: self._unary("GetInfo", types_pb2.GetInfoRequest(), types_pb2.ServiceInfo))
        )

    def prompts(self) -> EvalPrompts:
        if self._http is not None:
            out = self._retrying(lambda: self._http.request("GET", "/v1/prompts", 60.0))  # type: ignore[union-attr]
            return EvalPrompts(
                out["benchmark"], out["duplicates"], [(p["prompt_id"], p["prompt"]) for p in out["prompts"]]
            )
        reply = self._retrying(
            lambda: self._unary("ListPrompts", eval_pb2.ListPromptsRequest(), eval_pb2.ListPromptsResponse, 60.0)
        )
        return EvalPrompts(reply.benchmark, reply.duplicates, [(p.prompt_id, p.prompt) for p in reply.prompts])

    def start_run(self, step: int) -> EvalRun:
        if self._http is not None:
            out = self._retrying(lambda: self._http.request("POST", "/v1/runs", 120.0, {"step": step}))  # type: ignore[union-attr]
            return EvalRun(out["run_id"], out["run_secret"])
        reply = self._retrying(
            lambda: self._unary("StartRun", eval_pb2.StartRunRequest(step=step), eval_pb2.StartRunResponse, 120.0)
        )
        return EvalRun(reply.run_id, reply.run_secret)

    def submit(self, run: EvalRun, images: Iterable[EvalImage]) -> int:
        """Send images in batches of `batch_size` (over gRPC: one stream); returns how many were accepted.
        The service judges them as they arrive and holds the stream back while its queue is full."""
        if self._http is not None:
            accepted = 0
            for batch in _batches(images, self.batch_size):
                body = {"run_secret": run.secret, "images": [_image_json(i) for i in batch]}
                accepted += self._http.request("POST", f"/v1/runs/{run.run_id}/images", self.timeout_s, body)[
                    "accepted"
                ]
            return accepted
        assert self._channel is not None
        stub = self._channel.stream_unary(
            f"/{_SERVICE}/SubmitImages",
            request_serializer=eval_pb2.SubmitImagesRequest.SerializeToString,
            response_deserializer=eval_pb2.SubmitImagesResponse.FromString,
        )
        requests = (
            eval_pb2.SubmitImagesRequest(run_id=run.run_id, run_secret=run.secret, images=[_image_pb(i) for i in batch])
            for batch in _batches(images, self.batch_size)
        )
        try:
            return stub(requests, timeout=self.timeout_s).accepted
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def finish(self, run: EvalRun) -> RunSummary:
        """Wait for the last judgement; returns the summary (accuracies NaN when nothing was judged)."""
        if self._http is not None:
            body = {"run_secret": run.secret}
            return _summary_from_json(self._http.request("POST", f"/v1/runs/{run.run_id}/finish", self.timeout_s, body))
        request = eval_pb2.FinishRunRequest(run_id=run.run_id, run_secret=run.secret)
        return _summary_from_pb(self._unary("FinishRun", request, eval_pb2.RunSummary, self.timeout_s))

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> EvalClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _batches(images: Iterable[EvalImage], size: int) -> Iterator[list[EvalImage]]:
    batch: list[EvalImage] = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _image_pb(i: EvalImage) -> eval_pb2.GeneratedImage:
    return eval_pb2.GeneratedImage(
        prompt_id=i.prompt_id,
        duplicate=i.duplicate,
        image=types_pb2.Image(data=i.image, format=image_format_to_pb(i.image_format)),
    )


def _image_json(i: EvalImage) -> dict:
    return {
        "prompt_id": i.prompt_id,
        "duplicate": i.duplicate,
        "image": {"data": base64.b64encode(i.image).decode(), "format": i.image_format.value},
    }


def _summary_from_pb(s: eval_pb2.RunSummary) -> RunSummary:
    def dims(scores: Iterable[eval_pb2.DimensionScore]) -> list[DimensionScore]:
        return [DimensionScore(d.name, d.correct, d.total, d.accuracy) for d in scores]

    return RunSummary(
        run_id=s.run_id,
        step=s.step,
        images_judged=s.images_judged,
        parse_failures=s.parse_failures,
        errors=s.errors,
        sub_dimensions=dims(s.sub_dimensions),
        primary_dimensions=dims(s.primary_dimensions),
        overall_accuracy=s.overall_accuracy,
        primary_mean_accuracy=s.primary_mean_accuracy,
    )


def _summary_from_json(out: dict) -> RunSummary:
    def dims(scores: list[dict]) -> list[DimensionScore]:
        return [DimensionScore(d["name"], d["correct"], d["total"], d["accuracy"]) for d in scores]

    def accuracy(value: float | None) -> float:
        return float("nan") if value is None else value

    return RunSummary(
        run_id=out["run_id"],
        step=out["step"],
        images_judged=out["images_judged"],
        parse_failures=out["parse_failures"],
        errors=out["errors"],
        sub_dimensions=dims(out["sub_dimensions"]),
        primary_dimensions=dims(out["primary_dimensions"]),
        overall_accuracy=accuracy(out["overall_accuracy"]),
        primary_mean_accuracy=accuracy(out["primary_mean_accuracy"]),
    )
