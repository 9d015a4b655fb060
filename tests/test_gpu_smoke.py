"""benchmarks/gpu_smoke.py (`make gpu-smoke`) is not dead on arrival: its CPU variant (the tiny DeepGen in
bf16, small batches) runs every fact end to end and reports each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_smoke import FACTS, main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_variant_settles_every_fact(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    report = tmp_path / "smoke.json"
    args = [
        "--device", "cpu", "--model", "tiny", "--image_size", "64", "--batch", "4", "--update_batch", "2",
        "--vae_batch_size", "2", "--passes", "2", "--num_inference_steps", "4", "--report", str(report),
    ]  # fmt: skip
    results = main(args)
    assert set(results) == set(FACTS)
    assert all(r["ok"] for r in results.values()), results
    assert results["vae_decode"]["max_abs_diff"] <= 1 / 255
    assert results["attention_kernels"]["unpadded"]  # the profiler saw the attention
    assert results["rollout_vs_update"]["max_abs_ratio_minus_1"] < 1e-4
    assert results["sft_share"]["relative_error"] < 0.05
    norms = results["component_norms"]
    assert norms["vmap_fallbacks"] == []
    assert norms["relative_error"] < 0.02
    assert min(norms["grad_norm/policy"], norms["grad_norm/beta_kl"]) > 0
    out = capsys.readouterr().out
    for fact in FACTS:
        assert f"{fact}" in out
    assert json.loads(report.read_text())["device"] == "CPU"


def test_batch_must_split_into_update_batches():
    with pytest.raises(SystemExit, match="--batch 5 must be a multiple of --update_batch 2"):
        main(["--device", "cpu", "--model", "tiny", "--batch", "5", "--update_batch", "2"])
