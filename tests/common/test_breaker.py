"""Circuit breaker state machine, on a controlled clock."""

from __future__ import annotations

import pytest

from deepgen_common.client import BreakerState, CircuitBreaker, CircuitOpenError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_fails_fast():
    clock = Clock()
    breaker = CircuitBreaker("svc", failure_threshold=3, reset_after_s=10, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError, match=r"open after 3 consecutive failures; next trial in 10\.0s"):
        breaker.before_call()


def test_success_resets_the_failure_count():
    breaker = CircuitBreaker("svc", failure_threshold=2, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_half_open_lets_exactly_one_trial_through():
    clock = Clock()
    breaker = CircuitBreaker("svc", failure_threshold=1, reset_after_s=5, clock=clock)
    breaker.record_failure()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.before_call()  # the trial
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the trial is out
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()


def test_failed_trial_reopens_for_a_full_period():
    clock = Clock()
    breaker = CircuitBreaker("svc", failure_threshold=3, reset_after_s=5, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now = 6.0
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 10.9
    assert breaker.state is BreakerState.OPEN
    clock.now = 11.0
    assert breaker.state is BreakerState.HALF_OPEN


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("svc", failure_threshold=0)
