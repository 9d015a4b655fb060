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
from urllib.parse import quote

import grpc

from deepgen.common.v1 import types_pb2
from deepgen.eval.v1 import eval_pb2
from deepgen_common.client.credentials import ClientCredentials
from deepgen_common.client.failover import RoundRobin
from deepgen_common.client.reward_client import RetryPolicy
from deepgen_common.client.transports import HttpTransport, TransientError, grpc_channel, rpc_error
from deepgen_common.client.urls import ServiceURL, parse_service_url
from deepgen_common.convert import image_format_to_pb, info_from_pb
from deepgen_common.types import DimensionScore, ImageFormat, ImageResult, RunSummary, ServiceInfo

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
    """An open run: its id (what `str()` and logs show), the secret StartRun returned with it, and the
    address of the service process that holds it (a run lives in one process)."""

    run_id: str
    secret: str = field(repr=False)
    address: str = ""

    def __str__(self) -> str:
        return self.run_id


@dataclass(frozen=True)
class EvalImage:
    """Duplicate `duplicate` of prompt `prompt_id`, encoded."""

    prompt_id: str
    duplicate: int
    image: bytes
    image_format: ImageFormat = ImageFormat.PNG


class _Endpoint:
    """One address of the eval service: an HTTP transport or a gRPC channel, with the token."""

    def __init__(self, url: ServiceURL, credentials: ClientCredentials, max_message_bytes: int) -> None:
        self.name = str(url)
        self.http = HttpTransport(url, credentials) if url.protocol == "http" else None
        self.channel = grpc_channel(url, credentials, max_message_bytes) if url.protocol == "grpc" else None
        self.metadata = credentials.grpc_metadata

    def unary(self, method: str, request: object, response_type: type[T], timeout_s: float = 30.0) -> T:
        assert self.channel is not None
        stub = self.channel.unary_unary(
            f"/{_SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        try:
            return stub(request, timeout=timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        if self.channel is not None:
            self.channel.close()


class EvalClient:
    """Synchronous client of one eval service.

    `url` takes any form of `deepgen_common.client.urls`. With several addresses, calls that change
    nothing and StartRun go round-robin with failover; a run's submissions and FinishRun go to the
    address that started it (a run lives in one service process; `EvalRun.address` names it). The
    token and TLS roots come from `credentials`, by default from the environment
    (`ClientCredentials.from_env`).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 3600.0,
        batch_size: int = 16,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
        credentials: ClientCredentials | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self.retry = retry or RetryPolicy()
        credentials = credentials if credentials is not None else ClientCredentials.from_env()
        parts = parse_service_url(url).split()
        endpoints = [_Endpoint(part, credentials, max_message_bytes) for part in parts]
        self._robin = RoundRobin(endpoints, [e.name for e in endpoints])

    def _retrying(self, call: Callable[[_Endpoint], T]) -> T:
        for attempt in range(self.retry.max_attempts):
            try:
                return self._robin.call(call)
            except TransientError:
                if attempt + 1 == self.retry.max_attempts:
                    raise
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def info(self) -> ServiceInfo:
        def call(e: _Endpoint) -> ServiceInfo:
            if e.http is not None:
                return e.http.info(30.0)
            return info_from_pb(e.unary("GetInfo", types_pb2.GetInfoRequest(), types_pb2.ServiceInfo))

        return self._retrying(call)

    def prompts(self, benchmark: str = "") -> EvalPrompts:
        """The prompts of benchmark set `benchmark` (e.g. "zh"; empty: the service's first set)."""

        def call(e: _Endpoint) -> EvalPrompts:
            if e.http is not None:
                path = f"/v1/prompts?benchmark={quote(benchmark)}" if benchmark else "/v1/prompts"
                out = e.http.request("GET", path, 60.0)
                return EvalPrompts(
                    out["benchmark"], out["duplicates"], [(p["prompt_id"], p["prompt"]) for p in out["prompts"]]
                )
            request = eval_pb2.ListPromptsRequest(benchmark=benchmark)
            reply = e.unary("ListPrompts", request, eval_pb2.ListPromptsResponse, 60.0)
            return EvalPrompts(reply.benchmark, reply.duplicates, [(p.prompt_id, p.prompt) for p in reply.prompts])

        return self._retrying(call)

    def start_run(self, step: int, benchmark: str = "", duplicates: int = 0) -> EvalRun:
        """Open a run for `step` on benchmark set `benchmark` (empty: the service's first set) with
        `duplicates` images per prompt (0: the service's default). The returned handle pickles, so one
        rank can open a run and share it with the others."""

        def call(e: _Endpoint) -> EvalRun:
            if e.http is not None:
                body = {"step": step, "benchmark": benchmark, "duplicates": duplicates}
                out = e.http.request("POST", "/v1/runs", 120.0, body)
                return EvalRun(out["run_id"], out["run_secret"], e.name)
            request = eval_pb2.StartRunRequest(step=step, benchmark=benchmark, duplicates=duplicates)
            reply = e.unary("StartRun", request, eval_pb2.StartRunResponse, 120.0)
            return EvalRun(reply.run_id, reply.run_secret, e.name)

        return self._retrying(call)

    def _endpoint_of(self, run: EvalRun) -> _Endpoint:
        """The address that holds `run` (the only one, for a one-address URL)."""
        members = self._robin.members
        if len(members) == 1:
            return members[0]
        for endpoint in members:
            if endpoint.name == run.address:
                return endpoint
        raise ValueError(f"run {run} was started at {run.address or 'an unknown address'}, not one of {self.url}")

    def submit(self, run: EvalRun, images: Iterable[EvalImage]) -> int:
        """Send images in batches of `batch_size` (over gRPC: one stream); returns how many were accepted.
        The service judges them as they arrive and holds the stream back while its queue is full."""
        e = self._endpoint_of(run)
        if e.http is not None:
            accepted = 0
            for batch in _batches(images, self.batch_size):
                body = {"run_secret": run.secret, "images": [_image_json(i) for i in batch]}
                accepted += e.http.request("POST", f"/v1/runs/{run.run_id}/images", self.timeout_s, body)["accepted"]
            return accepted
        assert e.channel is not None
        stub = e.channel.stream_unary(
            f"/{_SERVICE}/SubmitImages",
            request_serializer=eval_pb2.SubmitImagesRequest.SerializeToString,
            response_deserializer=eval_pb2.SubmitImagesResponse.FromString,
        )
        requests = (
            eval_pb2.SubmitImagesRequest(run_id=run.run_id, run_secret=run.secret, images=[_image_pb(i) for i in batch])
            for batch in _batches(images, self.batch_size)
        )
        try:
            return stub(requests, timeout=self.timeout_s, metadata=e.metadata).accepted
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def finish(self, run: EvalRun) -> RunSummary:
        """Wait for the last judgement; returns the summary (accuracies NaN when nothing was judged)."""
        e = self._endpoint_of(run)
        if e.http is not None:
            body = {"run_secret": run.secret}
            return _summary_from_json(e.http.request("POST", f"/v1/runs/{run.run_id}/finish", self.timeout_s, body))
        request = eval_pb2.FinishRunRequest(run_id=run.run_id, run_secret=run.secret)
        return _summary_from_pb(e.unary("FinishRun", request, eval_pb2.RunSummary, self.timeout_s))

    def close(self) -> None:
        for endpoint in self._robin.members:
            endpoint.close()

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
        answer_rules=s.answer_rules,
        benchmark=s.benchmark,
        images=[
            ImageResult(
                i.prompt_id,
                i.duplicate,
                i.prompt,
                list(i.testpoints),
                list(i.scores) if i.status == "ok" else None,
                i.analysis or None,
                i.status,  # type: ignore[arg-type]
                i.detail,
            )
            for i in s.images
        ],
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
        answer_rules=out["answer_rules"],
        benchmark=out["benchmark"],
        images=[
            ImageResult(
                i["prompt_id"],
                i["duplicate"],
                i["prompt"],
                i["testpoints"],
                i["scores"],
                i["analysis"],
                i["status"],
                i["detail"],
            )
            for i in out["images"]
        ],
    )
