"""The reward names of the original DeepGen-RL's ``--reward_funcs``: those computed here, and for every
other one a refusal that says what it was and what to use instead. The original silently dropped a
misspelt name; here it is refused with the closest valid name."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence

_MODEL_SERVICE = (
    "a model-based reward the original called over HTTP with pickled payloads ({what}); it has no service here "
    "yet (model-based rewards come as reward services): use clip_sim, ocr or unifiedreward_think"
)
_ALWAYS_ZERO = (
    "in the original its call always failed and was silently scored 0 ({what}), so it never trained anything; drop it"
)
# The original's registry (grpo_deepgen.py) minus what this trainer computes, with why each is refused.
REFUSED: dict[str, str] = {
    "pickscore": _MODEL_SERVICE.format(what="PickScore at PICKSCORE_URL"),
    "hps": _MODEL_SERVICE.format(what="HPSv2 at HPS_URL"),
    "deqa": _MODEL_SERVICE.format(what="DeQA-Score at DEQA_URL"),
    "image_reward": _MODEL_SERVICE.format(what="ImageReward at IMAGE_REWARD_URL"),
    "aesthetic": _MODEL_SERVICE.format(what="the LAION aesthetic predictor at AESTHETIC_URL"),
    "unifiedreward_sglang": _MODEL_SERVICE.format(what="UnifiedReward on SGLang at UNIFIEDREWARD_SGLANG_URL"),
    "editreward": _MODEL_SERVICE.format(what="EditReward at EDITREWARD_URL, an image-editing reward"),
    "ocr_vllm": "the original's VLM OCR through an OpenAI-compatible endpoint; use ocr (reward-ocr at OCR_URL)",
    "unifiedreward": "the original's pointwise UnifiedReward (mean of Alignment and Style scores); use "
    "unifiedreward_think (pairwise win rates from reward-unified at UNIFIEDREWARD_THINK_URL)",
    "recon": _ALWAYS_ZERO.format(what="PSNR of a reconstruction, given PIL images and captions"),
    "gen_eval": _ALWAYS_ZERO.format(what="GenEval, called without its meta_files"),
    "sim_direction": _ALWAYS_ZERO.format(what="CLIP directional similarity for editing, called with the wrong arity"),
    "format": _ALWAYS_ZERO.format(what="an <answer> regex over text completions, given images"),
}


def check_reward_funcs(names: Sequence[str], known: Collection[str]) -> tuple[str, ...]:
    """``names`` (``--reward_funcs``) if every one is in ``known``; else ValueError naming each bad name,
    what it is and what to use here."""
    problems = []
    for name in names:
        if name in known:
            continue
        if name in REFUSED:
            problems.append(f"{name!r}: {REFUSED[name]}")
        else:
            close = difflib.get_close_matches(name, [*known, *REFUSED], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{name!r}: unknown reward{hint}; valid here: {', '.join(known)}")
    if problems:
        raise ValueError("--reward_funcs: " + "; ".join(problems))
    if len(set(names)) != len(names):
        raise ValueError(f"--reward_funcs names a reward twice: {list(names)}; list each once")
    return tuple(names)
