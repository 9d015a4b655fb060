"""deepgen_trainer.observe.tracking: the Prometheus endpoint scraped over HTTP and parsed by the real parser,
offline wandb / swanlab runs on disk, the no-op cases."""

from __future__ import annotations

import math
import sys

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deepgen_trainer.observe.tracking import Tracker


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_endpoint_exports_every_step_metric(tmp_path):
    with Tracker(["none"], output_dir=tmp_path, prometheus_port=0, prometheus_addr="127.0.0.1") as tracker:
        assert tracker.prometheus_port
        tracker.log({"reward/ocr/mean": 0.25, "time/step": 3.0, "lr": 2e-6}, step=1)
        tracker.log({"reward/ocr/mean": 0.75, "adv/clamp_frac": torch.tensor(0.5), "sft/loss": math.nan}, step=2)
        samples = _scrape(tracker.prometheus_port)
        port = tracker.prometheus_port
    metric = {labels[0][1]: v for (name, labels), v in samples.items() if name == "deepgen_trainer_metric"}
    assert metric["reward/ocr/mean"] == 0.75  # latest value
    assert metric["time/step"] == 3.0  # kept from step 1
    assert metric["lr"] == 2e-6
    assert metric["adv/clamp_frac"] == 0.5  # tensors are accepted
    assert math.isnan(metric["sft/loss"])
    assert samples[("deepgen_trainer_step", ())] == 2
    assert samples[("deepgen_trainer_steps_total", ())] == 2
    with pytest.raises(httpx.ConnectError):  # closed with the tracker
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_prometheus_series_are_bounded(tmp_path):
    with Tracker(prometheus_port=0, prometheus_addr="127.0.0.1", max_prometheus_series=2) as tracker:
        tracker.log({"a": 1.0, "b": 2.0, "c": 3.0}, step=1)
        tracker.log({"a": 4.0}, step=2)
        samples = _scrape(tracker.prometheus_port)
    metric = {labels[0][1]: v for (name, labels), v in samples.items() if name == "deepgen_trainer_metric"}
    assert metric == {"a": 4.0, "b": 2.0}


def test_wandb_offline_writes_a_run_under_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker(["wandb"], output_dir=tmp_path, run_name="test", config={"learning_rate": 2e-6}) as tracker:
        tracker.log({"reward/ocr/mean": 0.5, "lr": 2e-6}, step=1)
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))


def test_wandb_keeps_logged_images_with_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    sheet = tmp_path / "sheet.png"
    Image.new("RGB", (40, 30), "red").save(sheet)
    with Tracker(["wandb"], output_dir=tmp_path / "out", run_name="test") as tracker:
        tracker.log_images({"eval/en/contact_sheet": sheet}, step=2)
    [run_dir] = (tmp_path / "out" / "wandb").glob("offline-run-*")
    [logged] = run_dir.rglob("media/images/eval/en/contact_sheet_*.png")
    assert Image.open(logged).size == (40, 30)


def test_swanlab_offline_writes_a_run_under_the_output_dir(tmp_path, monkeypatch):
    """The real swanlab package (the trainer's `tracking` extra), offline: a run folder with the config and
    the logged metrics, nothing sent anywhere."""
    for var in ("SWANLAB_MODE", "SWANLAB_LOG_DIR", "SWANLAB_PROJECT", "SWANLAB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with Tracker(["swanlab"], output_dir=tmp_path, run_name="test", config={"learning_rate": 2e-6}) as tracker:
        tracker.log({"reward/ocr/mean": 0.5}, step=1)
        tracker.log({"reward/ocr/mean": 0.75}, step=2)
        sheet = tmp_path / "sheet.png"
        Image.new("RGB", (40, 30), "red").save(sheet)
        tracker.log_images({"eval/en/contact_sheet": sheet}, step=2)
    [run_dir] = (tmp_path / "swanlog").glob("run-*")
    assert "learning_rate" in (run_dir / "files" / "config.yaml").read_text()
    [records] = run_dir.glob("run-*.swanlab")
    assert b"reward/ocr/mean" in records.read_bytes()


def test_none_and_other_ranks_are_no_ops(tmp_path):
    with Tracker(["none"], output_dir=tmp_path) as tracker:
        tracker.log({"lr": 1.0}, step=1)
    # Rank 1 starts no run and no endpoint even when asked for them (and imports neither package).
    with Tracker(["wandb", "swanlab"], output_dir=tmp_path, prometheus_port=0, rank=1) as tracker:
        tracker.log({"lr": 1.0}, step=1)
        assert tracker.prometheus_port is None
    assert list(tmp_path.iterdir()) == []


def test_bad_backends_and_missing_packages_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid: wandb, swanlab, none"):
        Tracker(["tensorboard"])
    with pytest.raises(ValueError, match="pass 'none' alone"):
        Tracker(["none", "wandb"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    monkeypatch.setitem(sys.modules, "swanlab", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker(["wandb"], output_dir=tmp_path)
    with pytest.raises(ImportError, match="pip install swanlab"):
        Tracker(["swanlab"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="must be a scalar"), Tracker() as tracker:
        tracker.log({"x": torch.ones(2)}, step=1)
