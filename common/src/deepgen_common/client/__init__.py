"""Clients of the contracts `deepgen.reward.v1` (rewards) and `deepgen.eval.v1` (evaluation), over gRPC or HTTP/JSON."""

from deepgen_common.client.breaker import BreakerState, CircuitBreaker, CircuitOpenError
from deepgen_common.client.credentials import ClientCredentials
from deepgen_common.client.eval_client import EvalClient, EvalImage, EvalPrompts, EvalRun
from deepgen_common.client.readiness import is_ready, wait_ready
from deepgen_common.client.reward_client import RetryPolicy, RewardClient, make_transport
from deepgen_common.client.transports import OverloadedError, RewardServiceError, TransientError
from deepgen_common.client.urls import ServiceURL, parse_service_url

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "ClientCredentials",
    "EvalClient",
    "EvalImage",
    "EvalPrompts",
    "EvalRun",
    "OverloadedError",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ServiceURL",
    "TransientError",
    "is_ready",
    "make_transport",
    "parse_service_url",
    "wait_ready",
]
