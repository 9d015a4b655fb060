"""benchmarks/bench_ocr.py (`make bench-ocr`): the headline ratios come from interleaved rounds.

The layouts here are scripted stand-ins with known throughputs per round, so the test checks the
scheduling (every layout once per round, the order rotated) and the statistics (each round's ratio is
against that round's best bare layout; the median with its min-max spread); the bench itself measures
the real engine and service, and is not run here (minutes of all cores, never a timed test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from benchmarks.bench_ocr import Row, rotated, run_rounds, spread


@dataclass
class Scripted:
    """A layout whose r-th measurement takes 1 s for `rates[r]` images."""

    name: str
    rates: list[float]
    calls: list[str] = field(default_factory=list)

    def measure(self, echo: bool = True) -> Row:
        r = sum(1 for c in self.calls if c == self.name)
        self.calls.append(self.name)
        return Row(self.name, int(self.rates[r]), 1.0, [0.1])


def test_rotated_starts_at_the_shift() -> None:
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_rounds_interleave_and_ratio_against_each_rounds_best_bare(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    # Round 1: bare A is best (10), service 9 -> 90%. Round 2: the machine is busier; bare B is best (6),
    # service 6 -> 100%. Round 3: A 20 (best), service 19 -> 95%. Measured once each, back to back, the
    # service of round 2 against the bare of round 3 would read 30%.
    bare = [Scripted("A", [10, 5, 20], calls), Scripted("B", [8, 6, 12], calls)]
    service = Scripted("service grpc, 1 client x 32 images/request", [9, 6, 19], calls)
    rounds = run_rounds(bare, [service], 3)
    assert calls == ["A", "B", service.name, "B", service.name, "A", service.name, "A", "B"]
    assert [rounds.best_bare(r).name for r in range(3)] == ["A", "B", "A"]
    assert rounds.ratios(service.name) == pytest.approx([0.9, 1.0, 0.95])
    assert spread(rounds.ratios(service.name)) == "95% (90%-100%, 3 rounds)"
    assert rounds.median_rate(service.name) == 9
    assert rounds.latencies(service.name) == [0.1, 0.1, 0.1]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "  round 1/3: best bare 10.00 img/s (A); grpc, 1 client x 32 images/request 90%",
        "  round 2/3: best bare 6.00 img/s (B); grpc, 1 client x 32 images/request 100%",
        "  round 3/3: best bare 20.00 img/s (A); grpc, 1 client x 32 images/request 95%",
    ]
