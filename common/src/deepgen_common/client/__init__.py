"""Clients of the contracts `deepgen.reward.v1` (rewards) and `deepgen.eval.v1` (evaluation), over gRPC or HTTP/JSON."""

from deepgen_common.client.breaker import BreakerState, CircuitBreaker, CircuitOpenError
from deepgen_common.client.eval_client import EvalClient, EvalImage, EvalPrompts, EvalRun
from deepgen_common.client.readiness import is_ready, wait_ready
from deepgen_common.client.reward_client import RetryPolicy, RewardClient, make_transport
from deepgen_common.client.transports import RewardServiceError, TransientError

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "EvalClient",
    "EvalImage",
    "EvalPrompts",
    "EvalRun",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "TransientError",
    "is_ready",
    "make_transport",
    "wait_ready",
]
