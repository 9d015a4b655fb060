"""``--log_component_grad_norm``: the norms of the gradient parts of one optimizer step, the policy
loss, β·KL and the SFT auxiliary loss, each the norm of that part's gradient summed over the step's
backward passes and averaged over ranks (the gradient the optimizer steps with is their sum).

They are measured, not estimated, and the update does not change. On a measured step each backward
pass computes its pieces' gradients itself: the policy and β·KL pieces share the velocity's forward,
so one backward pass carries both (a batched vector-Jacobian product, ``is_grads_batched``), and the
SFT loss has its own forward and backward pass as always. Each piece's gradient is added to its
part's sum, and the pass hands the updater `gradient_loss`, a loss whose gradient is exactly the
pieces' sum, for its one ``backward`` call. So the optimizer sees the same gradient, the same number
of backward calls (DeepSpeed counts each as a micro-step) and the same optimizer steps as on an
unmeasured step. (The original summed ‖increment‖² over calls and ranks, a proxy that grows with
their number, and split each backward in two under DeepSpeed, which doubled its optimizer steps.)

Cost on measured steps: the policy pass's backward propagates two cotangents instead of one (the
DiT's backward FLOPs of that pass double; no second traversal, no retained graph), one
gradient-sized float32 buffer per part and the two pieces' gradients in the weights' dtype while the
pass runs, all on the weights' device; ``make bench-grad-norms`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

PARTS: tuple[str, ...] = ("policy", "beta_kl", "sftaux")


class GradParts:
    """Sums, per part, the gradients of the pieces `measure` backpropagates during one optimizer step."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self._numel = sum(p.numel() for p in self.params)
        self._sums: dict[str, Tensor] = {}

    def start(self) -> None:
        """Begin a measured optimizer step: empty sums."""
        self._sums = {}

    def measure(self, pieces: Sequence[tuple[str, Tensor]]) -> Tensor:
        """Backpropagate the scalar `pieces` (part name, loss; one graph or several) in one backward
        pass, add each piece's gradient to its part's sum and return `gradient_loss` of their summed
        gradient, for the updater's backward."""
        for name, _ in pieces:
            if name not in PARTS:
                raise ValueError(f"unknown gradient part {name!r}; valid: {', '.join(PARTS)}")
        losses = torch.stack([loss.float() for _, loss in pieces])
        # Row k of the batched result is d(piece k)/d(params); a parameter no piece reaches gets None.
        grads = torch.autograd.grad(
            losses, self.params, torch.eye(len(pieces), device=losses.device), is_grads_batched=True, allow_unused=True
        )
        for k, (name, _) in enumerate(pieces):
            for view, g in zip(self._sum_views(name), grads, strict=True):
                if g is not None:
                    view.add_(g[k].reshape(-1))
        return gradient_loss(self.params, [None if g is None else _sum_rows(g) for g in grads])

    def finish(self, mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """``grad_norm/<part>`` of each part measured since `start`: the L2 norm of its summed gradient,
        averaged over ranks by `mean_over_ranks` (an in-place all-reduce mean of a flat float32
        tensor; None: this rank alone). Every rank must measure the same parts."""
        norms = {}
        for name in sorted(self._sums, key=PARTS.index):
            flat = self._sums[name]
            if mean_over_ranks is not None:
                flat = mean_over_ranks(flat)
            norms[f"grad_norm/{name}"] = float(torch.linalg.vector_norm(flat)) if flat.numel() else math.nan
        self._sums = {}
        return norms

    def _sum_views(self, name: str) -> list[Tensor]:
        """Part `name`'s sum as one flat float32 buffer (one all-reduce at the end), viewed per parameter."""
        if name not in self._sums:
            device = self.params[0].device if self.params else None
            self._sums[name] = torch.zeros(self._numel, dtype=torch.float32, device=device)
        return list(self._sums[name].split([p.numel() for p in self.params]))


def _sum_rows(batched: Tensor) -> Tensor:
    """Σ_k batched[k], in place into row 0 (no gradient-sized temporary)."""
    for row in batched[1:]:
        batched[0].add_(row)
    return batched[0]


def gradient_loss(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """A scalar whose gradient with respect to `params` is exactly `grads` (None: no gradient): Σ ⟨p, g⟩
    with g detached. Its backward is one elementwise product per parameter, so an updater that takes
    only losses (DeepSpeed's ``engine.backward``, with its loss scaling, accumulation and ZeRO hooks)
    receives gradients computed elsewhere through its usual path."""
    terms = [(p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads, strict=True) if g is not None]
    if not terms:
        raise ValueError("no parameter received a gradient: the pieces do not depend on the trained weights")
    return torch.stack([t.float() for t in terms]).sum()
