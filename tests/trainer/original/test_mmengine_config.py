"""The MMEngine config reader: the original's own model and SFT-aux configs read as mmengine reads them,
with none of the original's classes imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deepgen_trainer.original.mmengine_config import ConfigRef, MMEngineConfigError, read_mmengine_config
from tests.helpers import original_files

MODEL_CONFIG = "configs/models/qwen2_5_vl_7b_stable_diffusion_3_5_medium_hf_dynamic_dpo_fusion.py"
SFTAUX_CONFIG = "deepgen_rl/sft/configs/datasets/deepgen/t2i_grpo_moretextdata.py"


def test_the_original_model_config_reads_with_its_environment_and_names_its_classes(monkeypatch) -> None:
    monkeypatch.setenv("QWEN2_5_VL_MODEL_NAME_OR_PATH", "/models/qwen")
    monkeypatch.delenv("SD3_5_MODEL_NAME_OR_PATH", raising=False)
    config = read_mmengine_config(original_files() / MODEL_CONFIG)
    assert set(config) == {"sd3_5_model_name_or_path", "qwen2_5_vl_model_name_or_path", "tokenizer",
                           "prompt_template", "model"}  # fmt: skip
    model = config["model"]
    assert (model["num_queries"], model["num_fusion_layers"], model["connector"]["num_hidden_layers"]) == (128, 6, 6)
    assert model["lmm"]["pretrained_model_name_or_path"] == "/models/qwen"
    assert model["transformer"]["pretrained_model_name_or_path"].endswith("UniPic2-SD3.5M-Kontext-2B")
    assert model["lmm"]["torch_dtype"] == ConfigRef("torch.bfloat16")
    assert model["type"].name == (
        "deepgen_rl.models.deepgen.qwen2_5_vl_sd3_hf_dynamic_dpo_fusion.Qwen2p5VLStableDiffusion3DPOFusionHF"
    )
    assert model["tokenizer"]["type"].leaf == "from_pretrained"
    assert model["prompt_template"]["STOP_WORDS"] == ["<|im_end|>", "<|endoftext|>"]


def test_the_original_sftaux_config_reads_its_base_and_data_root(monkeypatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "/data")
    config = read_mmengine_config(original_files() / SFTAUX_CONFIG)
    assert config["image_size"] == 512  # from processors.py through read_base()
    assert config["image_process"] == "fix_pixels"
    datasets = config["train_dataloader"]["dataset"]["datasets"]
    assert len(datasets) == 13
    assert datasets[0]["data_path"] == "/data/t2i_grpo_sft/blip3o_60k.json"
    assert [d["sample_weight"] for d in datasets].count(3.0) == 3
    assert datasets[0]["type"] == ConfigRef("deepgen_rl.sft.datasets.text2image.blip3_o.BLIP3oDataset")
    assert config["dataset"]["type"] == ConfigRef("xtuner.dataset.ConcatDataset")
    assert not {"os", "read_base", "BLIP3oDataset"} & set(config)


def test_reading_imports_none_of_the_named_packages() -> None:
    code = (
        "import sys; from deepgen_trainer.original.mmengine_config import read_mmengine_config as r; "
        f"r({str(original_files() / MODEL_CONFIG)!r}); r({str(original_files() / SFTAUX_CONFIG)!r}); "
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'xtuner', 'mmengine') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_read_base_binds_in_order_and_later_assignments_win(tmp_path) -> None:
    write(tmp_path / "base" / "common.py", "size = 256\nmean = (0.5, 0.5)\n")
    config = write(
        tmp_path / "cfg.py",
        "from mmengine.config import read_base\nwith read_base():\n    from .base.common import size, mean as m\n"
        "size = size * 2\nitems = [dict(s=size, m=m)]\n",
    )
    assert read_mmengine_config(config) == {"size": 512, "m": (0.5, 0.5), "items": [{"s": 512, "m": (0.5, 0.5)}]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("import torch\nx = torch.device('cpu')\n", "calls torch.device(...)"),
        ("from mmengine.config import read_base\nwith read_base():\n    from .missing import a\n", "does not exist"),
        ("from .sibling import a\n", "outside `with read_base():`"),
        ("x = = 1\n", "not valid Python"),
        ("x = 1 / 0\n", "ZeroDivisionError"),
    ],
)
def test_configs_it_cannot_read_are_refused_naming_the_file_and_the_fix(tmp_path, text, message) -> None:
    config = write(tmp_path / "cfg.py", text)
    with pytest.raises(MMEngineConfigError, match=r"cfg\.py") as error:
        read_mmengine_config(config)
    assert message in str(error.value)
