"""``--log_component_grad_norm``: the norms of the gradient parts of one optimizer step, the policy
loss, β·KL and the SFT auxiliary loss, each the norm of that part's gradient summed over the step's
backward passes and averaged over ranks (the gradient the optimizer steps with is their sum). They
are measured, not estimated: every backward call carries one part, and a hook on each trainable
parameter adds the gradient that call produces to its part's sum. The update does not change: the
hooks return the gradient untouched, the calls accumulate the same gradient as one call of the sum,
and no optimizer step is added. (The original summed ‖increment‖² over calls and ranks, a proxy that
grows with their number, and split each backward in two under DeepSpeed, which doubled its optimizer
steps.)

Cost on measured steps: one gradient-sized float32 buffer per part, on the parameters' device; the
SFT loss has its own forward, so its own backward call costs nothing extra, but the policy and β·KL
pieces share the velocity's forward, so backpropagating them apart costs one more backward through
the DiT per pass (none once the KL gets its own backward pass anyway).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

PARTS: tuple[str, ...] = ("policy", "beta_kl", "sftaux")


class GradParts:
    """Sums, per part, the gradient each backward call adds to `params` while `measure` is on."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self._sums: dict[str, list[Tensor | None]] = {}
        self._part: str | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def start(self) -> None:
        """Begin a measured optimizer step: empty sums, hooks on."""
        self._sums = {}
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """The backward calls inside carry part `name`."""
        if name not in PARTS:
            raise ValueError(f"unknown gradient part {name!r}; valid: {', '.join(PARTS)}")
        self._part = name
        try:
            yield
        finally:
            self._part = None

    def finish(self, mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Hooks off; ``grad_norm/<part>`` of each part that received a gradient: the L2 norm of its sum
        over backward calls, averaged over ranks by `mean_over_ranks` (an all-reduce mean of a flat
        float32 tensor; None: this rank alone)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        norms = {}
        for name, sums in self._sums.items():
            flat = torch.cat([
                (s if s is not None else torch.zeros_like(p, dtype=torch.float32)).reshape(-1)
                for s, p in zip(sums, self.params, strict=True)
            ])  # fmt: skip
            if mean_over_ranks is not None:
                flat = mean_over_ranks(flat)
            norms[f"grad_norm/{name}"] = float(torch.linalg.vector_norm(flat)) if flat.numel() else math.nan
        self._sums = {}
        return norms

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def add(grad: Tensor) -> None:
            if self._part is None:
                return
            sums = self._sums.setdefault(self._part, [None] * len(self.params))
            if sums[i] is None:
                sums[i] = grad.detach().float().clone()
            else:
                sums[i].add_(grad.detach().float())

        return add
