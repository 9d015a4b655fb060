"""benchmarks/bench_grad_norms.py (`make bench-grad-norms`) runs end to end at a width of one head: the three
variants of a step are timed in every round and the memory line is printed."""

from __future__ import annotations

import pytest

from benchmarks.bench_grad_norms import BASELINE, MEASURED, SPLIT, main


def test_narrow_variant_times_every_way_of_a_step(capsys: pytest.CaptureFixture[str]) -> None:
    seconds = main(["--layers", "1", "--heads", "1", "--batch", "1", "--passes", "2", "--rounds", "2"])
    assert set(seconds) == {BASELINE, MEASURED, SPLIT}
    assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
    out = capsys.readouterr().out
    assert "| one backward of the sum (baseline) |" in out
    assert "GiB of float32 part sums" in out
