"""`--model_config`: the original's MMEngine model config read as it is, checked against the architecture this
trainer builds, its values used; a config describing another model is refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepgen_trainer.checkpoints.loading import _apply_model_config
from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.model.deepgen import PROMPT_TEMPLATE
from deepgen_trainer.original.model_config import ModelConfigError, read_model_config
from tests.helpers import original_files

MODEL_CONFIG = "configs/models/qwen2_5_vl_7b_stable_diffusion_3_5_medium_hf_dynamic_dpo_fusion.py"


def shipped() -> Path:
    return original_files() / MODEL_CONFIG


def test_the_shipped_config_describes_deepgen_1_0(monkeypatch) -> None:
    monkeypatch.setenv("SD3_5_MODEL_NAME_OR_PATH", "/models/sd35")
    monkeypatch.delenv("QWEN2_5_VL_MODEL_NAME_OR_PATH", raising=False)
    config = read_model_config(shipped())
    assert (config.num_queries, config.fused_layers) == (128, 6)
    assert config.connector == {"hidden_size": 2048, "intermediate_size": 11946, "num_hidden_layers": 6,
                                "num_attention_heads": 32}  # fmt: skip
    assert config.prompt_template == PROMPT_TEMPLATE
    assert config.sd3_5_model_name_or_path == "/models/sd35"
    assert config.qwen2_5_vl_model_name_or_path.endswith("Qwen2.5-VL-3B-Instruct")
    assert config.checkpoint is None
    assert [note.split("=")[0] for note in config.notes] == [
        "--model_config: model.use_activation_checkpointing", "--model_config: model.dpo_beta"
    ]  # fmt: skip


def test_its_values_build_the_model_and_fill_the_folders_the_flags_leave_unset(monkeypatch) -> None:
    monkeypatch.setenv("SD3_5_MODEL_NAME_OR_PATH", "/models/sd35")
    cfg = parse_args(["--model_config", str(shipped()), "--qwen2_5_vl_model_name_or_path", "/flag/qwen"], environ={})
    resolved, deepgen = _apply_model_config(cfg)
    assert (resolved.sd3_5_model_name_or_path, resolved.qwen2_5_vl_model_name_or_path) == ("/models/sd35", "/flag/qwen")
    assert (deepgen.num_queries, deepgen.fused_layers, deepgen.connector.num_hidden_layers) == (128, 6, 6)
    assert deepgen.connector.intermediate_size == 11946
    tiny = parse_args(["--model", "tiny", "--model_config", str(shipped())], environ={})
    assert _apply_model_config(tiny) == (tiny, None)  # checked; the tiny model keeps its tiny sizes


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("type=Qwen2p5VLStableDiffusion3DPOFusionHF,", "type=AutoencoderTiny,", "model.type"),
        ("freeze_lmm=True,", "freeze_lmm=False,", "model.freeze_lmm"),
        ("num_queries=128,", "num_queries=0,", "model.num_queries"),
        ("num_hidden_layers=6,", "num_hidden_layers=6, rope_theta=1e4,", "model.connector.rope_theta"),
        ("dpo_beta=0.01,", "dpo_beta=0.01, lora_r=16,", "model.lora_r"),
        (
            'pretrained_model_name_or_path=sd3_5_model_name_or_path,\n        subfolder="vae",',
            'pretrained_model_name_or_path="/other/vae",\n        subfolder="vae",',
            "model.vae.pretrained_model_name_or_path",
        ),
        ("type=AutoencoderKL.from_pretrained,", "type=AutoencoderTiny.from_pretrained,", "model.vae.type"),
    ],
)
def test_a_config_this_trainer_cannot_build_is_refused_naming_the_field(tmp_path, old, new, field) -> None:
    text = shipped().read_text()
    assert old in text
    changed = tmp_path / "model.py"
    changed.write_text(
        text.replace(old, new, 1).replace("from diffusers import", "from diffusers import AutoencoderTiny,")
    )
    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        read_model_config(changed)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _apply_model_config(parse_args(["--model_config", str(changed)], environ={}))
