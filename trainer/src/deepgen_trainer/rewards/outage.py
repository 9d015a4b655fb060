"""What the trainer does when a reward service is not there: wait for it at start, stop on a dead one.

- At start, `wait_for_reward_services` waits up to ``--reward_ready_timeout`` seconds for each remote
  reward to report ready (HTTP ``/readyz`` or gRPC health) and raises `RewardOutage` naming its URL
  variable and address when one is not; an address that answers like one of the original DeepGen-RL's
  services (`original_services`) stops the run at once with the fix.
- During training, `FailureWatch` counts, per reward, the consecutive steps in which the reward failed
  for every sample it was asked for (call failures and per-sample errors alike; *not applicable* is
  an answer, not a failure). When a reward with non-zero weight reaches ``--reward_failure_patience``
  such steps, the loop writes a checkpoint and raises `RewardOutage` (exit code 3 from
  ``python -m deepgen_trainer.train``). A step in which some samples were scored resets the count:
  partial failures stay masked as NaN, as the advantages expect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deepgen_common.client import is_ready, wait_ready
from deepgen_trainer.rewards.original_services import recognise_original_service
from deepgen_trainer.rewards.scorer import REWARD_URL_ENV, RewardStatus


class RewardOutage(RuntimeError):
    """A reward service is not ready at start, or stopped answering during training."""


def wait_for_reward_services(urls: Mapping[str, str], timeout_s: float) -> None:
    """Block until every service in ``urls`` (reward name → URL) is ready; ``timeout_s`` 0 skips the check.

    Raises:
        RewardOutage: a service was not ready within ``timeout_s`` seconds.
    """
    if timeout_s <= 0:
        return
    for name, url in urls.items():
        if not is_ready(url):  # not (yet) ready: stop at once if it is one of the original's services
            fix = recognise_original_service(REWARD_URL_ENV[name], url)
            if fix is not None:
                raise RewardOutage(f"reward {name}: {fix}")
        try:
            wait_ready(url, timeout_s=timeout_s)
        except TimeoutError:
            raise RewardOutage(
                f"reward {name}: the service at {REWARD_URL_ENV[name]}={url} was not ready within "
                f"{timeout_s:g} s (--reward_ready_timeout); start it, or point {REWARD_URL_ENV[name]} at a running one"
            ) from None


class FailureWatch:
    """Consecutive all-failed steps per reward, over the columns of the reward matrix."""

    def __init__(self, names: Sequence[str], patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.names = tuple(names)
        self.patience = patience
        self.failed_steps = dict.fromkeys(self.names, 0)

    def update(self, status: Tensor) -> str | None:
        """Count one step's (N, K) `RewardStatus` codes; returns the first reward whose patience ran
        out (it failed for every requested sample in ``patience`` consecutive steps), else None.

        A reward not requested in this step keeps its count.
        """
        if status.ndim != 2 or status.shape[1] != len(self.names):
            raise ValueError(f"status must be (N, {len(self.names)}), got {tuple(status.shape)}")
        failed = torch.isin(status, torch.tensor([RewardStatus.ERROR, RewardStatus.UNAVAILABLE], dtype=status.dtype))
        requested = status != RewardStatus.NOT_REQUESTED
        exhausted = None
        for col, name in enumerate(self.names):
            if not bool(requested[:, col].any()):
                continue
            all_failed = bool(failed[:, col][requested[:, col]].all())
            self.failed_steps[name] = self.failed_steps[name] + 1 if all_failed else 0
            if exhausted is None and self.failed_steps[name] >= self.patience:
                exhausted = name
        return exhausted

    def message(self, name: str, url: str | None, last_error: str | None, checkpoint: str) -> str:
        """The error of a run stopped by reward ``name``."""
        return (
            f"reward {name} failed for every sample it was asked for in {self.failed_steps[name]} consecutive steps "
            f"(--reward_failure_patience {self.patience}); service {REWARD_URL_ENV.get(name, name)}={url}; last error: "
            f"{last_error or 'unknown'}. Checkpoint written to {checkpoint}: restart the service (or fix "
            f"{REWARD_URL_ENV.get(name, name)}) and run the same command to resume"
        )
