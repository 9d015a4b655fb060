"""The original's ``--model_config`` (an MMEngine model config) checked against the model this trainer builds.

The original builds ``model = dict(type=Qwen2p5VLStableDiffusion3DPOFusionHF, ...)`` from the file.
This trainer builds the same architecture (Qwen2.5-VL, think tokens, the SCB connector, the SD3.5 DiT
and VAE) itself, so the file is read with `read_mmengine_config` (nothing of the original imported)
and its values are used where they describe that architecture: the think-token count, the fused
layers, the connector's shape, the prompt template and the model folders. A file describing anything
else (another model class, a trained VLM or connector, a VAE from another folder, an unknown key) is
refused naming the field, rather than silently training a different model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepgen_trainer.original.mmengine_config import ConfigRef, MMEngineConfigError, read_mmengine_config

MODEL_CLASS = "Qwen2p5VLStableDiffusion3DPOFusionHF"
# Keys of the original's model dict and what becomes of them here.
_USED = {"type", "num_queries", "num_fusion_layers", "connector", "lmm", "tokenizer", "prompt_template",
         "transformer", "vae", "test_scheduler", "train_scheduler", "pretrained_pth"}  # fmt: skip
# Must hold the value given: this trainer trains the DiT only, with the VLM and connector frozen.
_FIXED = {"freeze_lmm": True, "freeze_mq": True, "freeze_transformer": False}
# Accepted, without effect here (the reason is logged).
_NO_EFFECT = {
    "use_activation_checkpointing": "--gradient_checkpointing / --no-gradient_checkpointing decides",
    "dpo_beta": "the SFT stage's DPO loss; GRPO does not use it",
}
_CONNECTOR_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"}
_CLASSES = {
    "lmm": "Qwen2_5_VLForConditionalGeneration",
    "transformer": "SD3Transformer2DModel",
    "vae": "AutoencoderKL",
    "test_scheduler": "FlowMatchEulerDiscreteScheduler",
    "train_scheduler": "FlowMatchEulerDiscreteScheduler",
    "tokenizer": "AutoTokenizer",
}


class ModelConfigError(ValueError):
    """A model config this trainer cannot build; the message names the file and the field."""


@dataclass(frozen=True)
class OriginalModelConfig:
    """What a ``--model_config`` says about the model, in this trainer's terms."""

    path: str
    num_queries: int
    fused_layers: int
    connector: dict[str, int]  # ConnectorConfig fields
    prompt_template: str  # with ``{prompt}``
    qwen2_5_vl_model_name_or_path: str | None
    sd3_5_model_name_or_path: str | None
    checkpoint: str | None  # the config's pretrained_pth
    notes: tuple[str, ...]  # one line per field accepted without effect


def read_model_config(path: str | Path) -> OriginalModelConfig:
    """Read and check the original's model config. Raises `ModelConfigError` naming the field."""
    try:
        config = read_mmengine_config(path)
    except MMEngineConfigError as exc:
        raise ModelConfigError(f"--model_config: {exc}") from None

    def fail(field: str, problem: str) -> ModelConfigError:
        return ModelConfigError(f"--model_config {path}: model.{field} {problem}")

    model = config.get("model")
    if not isinstance(model, dict):
        raise ModelConfigError(f"--model_config {path}: defines no `model = dict(...)`")
    if not isinstance(model.get("type"), ConfigRef) or model["type"].leaf != MODEL_CLASS:
        raise fail("type", f"is {_name(model.get('type'))}; this trainer builds {MODEL_CLASS} (DeepGen 1.0) only")
    unknown = sorted(set(model) - _USED - set(_FIXED) - set(_NO_EFFECT))
    if unknown:
        raise fail(unknown[0], f"is not a field of {MODEL_CLASS} this trainer builds (known: {sorted(_USED)})")
    for key, value in _FIXED.items():
        if model.get(key, value) is not value:
            raise fail(key, f"is {model[key]!r}; this trainer trains the DiT only (needs {key}={value})")
    for key, cls in _CLASSES.items():
        block = model.get(key, {"type": ConfigRef(f"{cls}.from_pretrained")})
        if not isinstance(block, dict) or _name(block.get("type")).split(".")[-2:-1] != [cls]:
            raise fail(f"{key}.type", f"is {_name(model[key].get('type'))}; expected {cls}.from_pretrained")

    connector = model.get("connector", {})
    extra = sorted(set(connector) - _CONNECTOR_KEYS - {"_attn_implementation"})
    if extra:
        raise fail(f"connector.{extra[0]}", f"is not a connector setting this trainer has ({sorted(_CONNECTOR_KEYS)})")
    counts = {"num_queries": model.get("num_queries", 128), "num_fusion_layers": model.get("num_fusion_layers", 6)}
    sizes = {f"connector.{k}": connector[k] for k in sorted(_CONNECTOR_KEYS & set(connector))}
    for key, value in {**counts, **sizes}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(key, f"must be a positive integer, got {value!r}")

    sd3 = _folder(model, "transformer")
    for key in ("vae", "test_scheduler", "train_scheduler"):
        other = _folder(model, key)
        if other is not None and sd3 is not None and other != sd3:
            raise fail(f"{key}.pretrained_model_name_or_path", f"is {other}, not the DiT's folder {sd3}; this "
                       "trainer loads the DiT, VAE and scheduler from one SD3.5 folder")  # fmt: skip
    qwen = _folder(model, "lmm")
    tokenizer = _folder(model, "tokenizer")
    if tokenizer is not None and qwen is not None and tokenizer != qwen:
        raise fail("tokenizer.pretrained_model_name_or_path", f"is {tokenizer}, not the VLM's folder {qwen}")
    pretrained = model.get("pretrained_pth")
    notes = [f"--model_config: model.{k}={model[k]!r} has no effect here: {why}" for k, why in _NO_EFFECT.items()
             if k in model]  # fmt: skip
    return OriginalModelConfig(
        path=str(path),
        num_queries=counts["num_queries"],
        fused_layers=counts["num_fusion_layers"],
        connector={k: connector[k] for k in _CONNECTOR_KEYS & set(connector)},
        prompt_template=_prompt_template(model.get("prompt_template"), fail),
        qwen2_5_vl_model_name_or_path=qwen,
        sd3_5_model_name_or_path=sd3,
        checkpoint=str(pretrained) if pretrained else None,
        notes=tuple(notes),
    )


def _name(value: Any) -> str:
    return value.name if isinstance(value, ConfigRef) else repr(value)


def _folder(model: dict[str, Any], key: str) -> str | None:
    block = model.get(key)
    return block.get("pretrained_model_name_or_path") if isinstance(block, dict) else None


def _prompt_template(template: Any, fail: Any) -> str:
    """The original's INSTRUCTION with GENERATION in place of ``{input}`` (the generation prompt), as one
    string with ``{prompt}`` (the shipped config gives this trainer's default template)."""
    if template is None:
        template = {"INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                    "GENERATION": "Generate an image: {input}"}  # fmt: skip
    for key in ("INSTRUCTION", "GENERATION"):
        if not isinstance(template.get(key), str) or "{input}" not in template[key]:
            raise fail(f"prompt_template.{key}", "must be a string holding {input}")
    return template["INSTRUCTION"].replace("{input}", template["GENERATION"].replace("{input}", "{prompt}"))
