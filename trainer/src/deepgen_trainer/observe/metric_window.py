"""``--logging_steps N``: the step metrics go to the trackers every N steps, each one the mean of its
values over those steps (the original's HF ``log()`` behaviour); `<output_dir>/metrics.jsonl` keeps
every step."""

from __future__ import annotations

import math


class MetricWindow:
    """Collects the metrics of the steps since the last send; `add` returns the means when one is due."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, step: int, metrics: dict[str, float], last: bool = False) -> dict[str, float] | None:
        """Add one step's metrics. Returns the mean of each metric over the steps it was logged in since
        the last send (NaN values are left out of a mean; a metric that was NaN throughout stays NaN)
        when `step` is a multiple of `every` or `last`; else None."""
        for name, value in metrics.items():
            self._sums.setdefault(name, 0.0)
            self._counts.setdefault(name, 0)
            if not math.isnan(value):
                self._sums[name] += value
                self._counts[name] += 1
        if step % self.every and not last:
            return None
        means = {k: self._sums[k] / self._counts[k] if self._counts[k] else math.nan for k in self._sums}
        self._sums, self._counts = {}, {}
        return means
