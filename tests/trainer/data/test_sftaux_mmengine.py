"""The original's SFT-aux config (MMEngine ``.py``) and data (JSON arrays of BLIP3o records) read as the
original reads them: the shipped ``t2i_grpo_moretextdata.py`` unchanged over stand-in data under
``DATA_ROOT``, its ``fix_pixels`` sizing, its weight × size sampling, and the options around it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepgen_trainer.config import parse_args
from deepgen_trainer.data.prompts import DataConfigError
from deepgen_trainer.data.sftaux import SftAuxLoader, original_image
from deepgen_trainer.data.sftaux_mmengine import load_mmengine_sftaux
from deepgen_trainer.original.mmengine_config import read_mmengine_config
from deepgen_trainer.run import sftaux_loader
from tests.helpers import original_files

SFTAUX_DIR = Path("deepgen_rl/sft/configs/datasets/deepgen")
SIZES = [(300, 200), (200, 300), (256, 256)]


def write_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def stand_in_data(config: dict, data_root: Path) -> dict[str, int]:
    """JSON arrays of {"image_path", "txt"} for every dataset of the config, images relative to its
    image_folder when it has one, else absolute; returns each dataset's record count."""
    counts = {}
    for k, entry in enumerate(config["dataset"]["datasets"]):
        data_path = Path(entry["data_path"])
        folder = Path(entry["image_folder"]) if entry.get("image_folder") else data_root / "abs" / data_path.stem
        records = []
        for i in range(2 + k % 3):
            name = f"{data_path.stem}_{i}.png"
            write_image(folder / name, SIZES[(i + k) % 3], seed=100 * k + i)
            records.append({"image_path": name if entry.get("image_folder") else str(folder / name),
                            "txt": f"caption {k}.{i}", "extra": "ignored"})  # fmt: skip
        data_path.parent.mkdir(parents=True, exist_ok=True)
        data_path.write_text(json.dumps(records))
        counts[data_path.stem] = len(records)
    return counts


@pytest.fixture
def shipped_config(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, int]]:
    """The original's SFT-aux config and its processors.py base, copied unchanged, over stand-in data."""
    configs = tmp_path / "configs"
    shutil.copytree(original_files() / SFTAUX_DIR, configs)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    config_file = configs / "t2i_grpo_moretextdata.py"
    counts = stand_in_data(read_mmengine_config(config_file), tmp_path / "data")
    return config_file, counts


def test_shipped_config_loads_with_weight_times_size_sampling(shipped_config) -> None:
    config_file, counts = shipped_config
    data, settings = load_mmengine_sftaux(config_file)
    config = read_mmengine_config(config_file)
    entries = config["dataset"]["datasets"]
    assert len(data.datasets) == len(entries) == 13
    assert (settings.batch_size, settings.num_workers) == (2, 4)
    # WeightedInfiniteSampler: p(dataset) ∝ sample_weight × its records.
    mass = [e["sample_weight"] * counts[Path(e["data_path"]).stem] for e in entries]
    probs = [d.sample_weight / sum(x.sample_weight for x in data.datasets) for d in data.datasets]
    assert probs == pytest.approx([m / sum(mass) for m in mass], rel=1e-12)
    assert {(d.image_process, d.image_size) for d in data.datasets} == {("fix_pixels", 512)}  # from processors.py
    loader = SftAuxLoader(data, seed=0)
    draws = [loader._draw(n) for n in range(6000)]
    for d, p in enumerate(probs):
        share = sum(dataset is data.datasets[d] for dataset, _, _ in draws) / len(draws)
        assert share == pytest.approx(p, abs=0.02)
    assert sum(empty for _, _, empty in draws) / len(draws) == pytest.approx(0.1, abs=0.015)


def test_fix_pixels_sizes_each_image_as_the_original(tmp_path: Path) -> None:
    for w, h in [(300, 200), (200, 300), (1000, 100), (512, 512)]:
        path = tmp_path / f"{w}x{h}.png"
        write_image(path, (w, h), seed=w)
        # resize_image_fix_pixels: r = 512/√(h·w), sides ⌈side·r/32⌉·32, PIL's default resize, no crop.
        r = 512 / math.sqrt(h * w)
        size = (math.ceil(w * r / 32) * 32, math.ceil(h * r / 32) * 32)
        with Image.open(path) as image:
            expected = torch.from_numpy(np.asarray(image.convert("RGB").resize(size)).copy()).permute(2, 0, 1)
        got = original_image(path, "fix_pixels", 512, 32)
        assert got.shape == (3, size[1], size[0])
        torch.testing.assert_close(got, expected.float() / 127.5 - 1.0)
    assert original_image(tmp_path / "300x200.png", "fix_pixels", 512, 32).shape == (3, 448, 640)  # by hand
    assert original_image(tmp_path / "1000x100.png", "dynamic", 256, 32).shape == (3, 32, 256)
    assert original_image(tmp_path / "300x200.png", "resize2square", 64, 32).shape == (3, 64, 64)


def test_batches_keep_each_images_size_and_use_worker_threads(shipped_config) -> None:
    config_file, _ = shipped_config
    data, _ = load_mmengine_sftaux(config_file)
    serial, threaded = SftAuxLoader(data, seed=3), SftAuxLoader(data, seed=3, num_workers=2)
    images, captions = serial.next_images(6)
    images2, captions2 = threaded.next_images(6)
    threaded.close()
    assert captions == captions2
    assert len({tuple(i.shape) for i in images}) > 1  # sizes differ within a batch, as in the original
    for a, b in zip(images, images2, strict=True):
        torch.testing.assert_close(a, b)


def write_config(path: Path, datasets: str) -> Path:
    path.write_text(
        "from deepgen_rl.sft.datasets.text2image.blip3_o import BLIP3oDataset\n"
        "from deepgen_rl.sft.datasets.text2image.caption_datasets import CaptionDataset\n"
        "from xtuner.dataset import ConcatDataset\n"
        f"dataset = dict(type=ConcatDataset, datasets=[{datasets}])\n"
        "train_dataloader = dict(batch_size=2, num_workers=0, dataset=dataset)\n"
    )
    return path


def test_caption_dataset_records_and_missing_images(tmp_path: Path, caplog) -> None:
    write_image(tmp_path / "img" / "a.png", (64, 64), 0)
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "a.json").write_text(json.dumps({"caption": "a cat", "short": "cat"}))
    (tmp_path / "cap.json").write_text(json.dumps([{"image": "a.png", "annotation": "a.json"}]))
    (tmp_path / "blip.json").write_text(json.dumps([{"image_path": "a.png", "txt": " x "},
                                                    {"image_path": "gone.png", "txt": "y"}]))  # fmt: skip
    config = write_config(
        tmp_path / "c.py",
        f"dict(type=CaptionDataset, data_path='{tmp_path}/cap.json', image_folder='{tmp_path}/img', "
        f"cap_folder='{tmp_path}/cap', cap_source='short', image_process='fix_pixels', image_size=64), "
        f"dict(type=BLIP3oDataset, data_path='{tmp_path}/blip.json', image_folder='{tmp_path}/img', "
        "image_process='fix_pixels', image_size=64, sample_weight=2.0)",
    )
    data, _ = load_mmengine_sftaux(config)
    assert [[i.caption for i in d.items] for d in data.datasets] == [["cat"], ["x"]]
    assert "1 of 2 images not found, left out" in caplog.text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("image_process='crop2square'", r"image_process: 'crop2square' is not supported here; use one of fix_pixels"),
        ("image_latents_folder='/x'", r"image_latents_folder: pre-computed latents"),
        ("image_sise=512", r"image_sise: not an argument of BLIP3oDataset"),
    ],
)
def test_what_cannot_be_used_is_refused_naming_the_key(tmp_path: Path, entry: str, message: str) -> None:
    write_image(tmp_path / "a.png", (64, 64), 0)
    (tmp_path / "d.json").write_text(json.dumps([{"image_path": str(tmp_path / "a.png"), "txt": "x"}]))
    config = write_config(tmp_path / "c.py", f"dict(type=BLIP3oDataset, data_path='{tmp_path}/d.json', {entry})")
    with pytest.raises(DataConfigError, match=message):
        load_mmengine_sftaux(config)


def test_disable_on_error_turns_sftaux_off_with_a_warning(tmp_path: Path, caplog) -> None:
    config = write_config(
        tmp_path / "c.py", f"dict(type=BLIP3oDataset, data_path='{tmp_path}/none.json', image_process='fix_pixels')"
    )
    args = ["--sftaux_dataset_config", str(config)]
    with pytest.raises(DataConfigError, match=r"no \.json file"):
        sftaux_loader(parse_args(args, environ={}), rank=0)
    assert sftaux_loader(parse_args([*args, "--sftaux_disable_on_error"], environ={}), rank=0) is None
    assert "SFT-aux is OFF for this run" in caplog.text


def test_training_with_an_mmengine_config_every_second_step(tmp_path: Path) -> None:
    from deepgen_trainer.train import train
    from tests.trainer.test_train import SMALL, metrics, train_yaml

    records = []
    for i, size in enumerate([(80, 64), (64, 80)]):  # two sizes: one DiT call per size
        write_image(tmp_path / "img" / f"{i}.png", size, i)
        records.append({"image_path": f"{i}.png", "txt": f"noise {i}"})
    (tmp_path / "d.json").write_text(json.dumps(records))
    config = write_config(
        tmp_path / "c.py",
        f"dict(type=BLIP3oDataset, data_path='{tmp_path}/d.json', image_folder='{tmp_path}/img', "
        "image_process='fix_pixels', image_size=64)",
    )
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--max_steps", "2", "--sftaux_dataset_config", str(config), "--sftaux_coef", "0.1",
            "--sftaux_every_n_steps", "2", "--sftaux_micro_batch_size", "3", "--sftaux_num_workers", "1"]  # fmt: skip
    train(parse_args(args, environ={}))
    rows = metrics(out)  # the first step and every second after it, as the original's global_step % 2
    assert rows[1]["sft/loss"] > 0
    assert "sft/loss" not in rows[2]
