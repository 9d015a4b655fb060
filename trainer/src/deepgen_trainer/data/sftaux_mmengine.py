"""The original DeepGen-RL's SFT-aux dataset config (an MMEngine ``.py`` file, e.g.
``t2i_grpo_moretextdata.py``) and its data, read as the original reads them, into `SftAuxData`.

The config is read by `deepgen_trainer.original.mmengine_config` (``with read_base():`` bases such as
``processors.py`` give ``image_size``; ``DATA_ROOT`` comes from the environment as the file asks;
the original's classes are named, never imported). Its ``train_dataloader.dataset`` (or top-level
``dataset``) is an xtuner ``ConcatDataset`` of dataset dicts, or one dataset dict:

- ``type=BLIP3oDataset``: ``data_path`` is a ``.json`` file holding a JSON array of records, or a folder
  whose ``*.json`` files are concatenated (in name order); each record's image is ``image_path``
  (joined to ``image_folder`` when set, else as given: absolute, or relative to the working directory,
  as the original opens it) and its caption ``txt``;
- ``type=CaptionDataset``: each record's image is ``image`` under ``image_folder`` and its caption is
  key ``cap_source`` (default ``caption``) of the JSON file ``annotation`` under ``cap_folder``.

Image sizing is the dataset's ``image_process`` (``fix_pixels``, ``dynamic``, ``resize2square``) with
its ``image_size`` and ``unit_image_size`` (`data.sftaux.original_image`); each image keeps its own size.

Sampling is the original's ``WeightedInfiniteSampler``: every record is drawn with probability ∝ its
dataset's ``sample_weight``, so a dataset is drawn ∝ weight × size (here: the dataset's mass is
weight × size, then a record uniformly). Captions are replaced by "" with probability 0.1, as the
original's model does in its loss. A record whose image file is missing is left out with one warning
per dataset (the original retried another record at random, silently, every time it met one).

What the original could configure but this trainer cannot use is refused naming the key:
pre-computed image tokens or latents (``image_tokens_folder``, ``image_latents_folder``,
``latents_ceph_folder``: ``.pt`` files read with ``torch.load``), ceph storage without a local
``image_folder``, and ``image_process='crop2square'`` (a random square crop; use ``fix_pixels``).
Keys that only fed the original's tokenizer (``tokenizer``, ``prompt_template``, ``max_length``, ...)
have no effect here: this trainer tokenises with its own model; one INFO line says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepgen_trainer.data.prompts import DataConfigError
from deepgen_trainer.data.sftaux import (
    DEFAULT_EMPTY_CAPTION_PROB,
    DEFAULT_RESOLUTION,
    SIDE_MULTIPLE,
    ImageCaption,
    SftAuxData,
    SftAuxDataset,
)
from deepgen_trainer.original.mmengine_config import ConfigRef, MMEngineConfigError, read_mmengine_config

log = logging.getLogger(__name__)

DATASET_TYPES: tuple[str, ...] = ("BLIP3oDataset", "CaptionDataset")
IMAGE_PROCESSES: tuple[str, ...] = ("fix_pixels", "dynamic", "resize2square")
# CaptionDataset.__init__'s arguments (BLIP3oDataset inherits them), by what this reader does with them.
_USED = ("type", "data_path", "image_folder", "image_process", "image_size", "unit_image_size", "sample_weight",
         "cap_folder", "cap_source")  # fmt: skip
_REFUSED_IF_SET = {
    "image_tokens_folder": "pre-computed image tokens (.pt files read with torch.load) cannot be used here",
    "image_latents_folder": "pre-computed latents (.pt files read with torch.load) cannot be used here",
    "latents_ceph_folder": "pre-computed latents on ceph cannot be used here",
}
_TOKENIZER_ONLY = ("tokenizer", "prompt_template", "max_length", "tokenizer_kwargs", "image_processor",
                   "image_length", "unconditional", "debug", "min_image_size", "ceph_folder",
                   "ceph_config")  # fmt: skip


@dataclass(frozen=True)
class MMEngineLoaderSettings:
    """What the config's ``train_dataloader`` says beyond the datasets (``--sftaux_micro_batch_size``
    and ``--sftaux_num_workers`` override them)."""

    batch_size: int | None
    num_workers: int | None


def load_mmengine_sftaux(path: Path | str) -> tuple[SftAuxData, MMEngineLoaderSettings]:
    """Read the original's SFT-aux config and its datasets. Raises `DataConfigError` naming the key."""
    file = Path(path)
    try:
        config = read_mmengine_config(file)
    except (MMEngineConfigError, OSError) as exc:
        raise DataConfigError(file, "", str(exc)) from exc
    loader = config.get("train_dataloader")
    loader = loader if isinstance(loader, dict) else {}
    root = loader.get("dataset", config.get("dataset"))
    if not isinstance(root, dict):
        raise DataConfigError(file, "train_dataloader.dataset", "missing", "define dataset = dict(type=..., ...)")
    entries = root.get("datasets") if _type(root) == "ConcatDataset" else [root]
    if not isinstance(entries, list) or not entries:
        raise DataConfigError(file, "dataset.datasets", "must be a non-empty list", "list the dataset dicts")
    datasets = [_dataset(entry, file, f"dataset.datasets[{i}]") for i, entry in enumerate(entries)]
    settings = MMEngineLoaderSettings(
        batch_size=loader.get("batch_size") if isinstance(loader.get("batch_size"), int) else None,
        num_workers=loader.get("num_workers") if isinstance(loader.get("num_workers"), int) else None,
    )
    ignored = sorted({k for e in entries for k, v in e.items() if k in _TOKENIZER_ONLY and v is not None})
    if ignored:
        log.info("%s: %s only fed the original's tokenizer or storage client; no effect here", file, ", ".join(ignored))
    return SftAuxData(tuple(datasets), DEFAULT_RESOLUTION, DEFAULT_EMPTY_CAPTION_PROB), settings


def _type(entry: Mapping[str, Any]) -> str:
    kind = entry.get("type")
    return kind.leaf if isinstance(kind, ConfigRef) else str(kind)


def _dataset(entry: Any, file: Path, where: str) -> SftAuxDataset:
    if not isinstance(entry, dict):
        raise DataConfigError(file, where, "must be a dict(type=BLIP3oDataset, ...)", "")
    kind = _type(entry)
    if kind not in DATASET_TYPES:
        raise DataConfigError(
            file, f"{where}.type", f"unknown dataset class {kind!r}", f"use {', '.join(DATASET_TYPES)}"
        )
    for key, value in entry.items():
        if key in _REFUSED_IF_SET and value is not None:
            raise DataConfigError(file, f"{where}.{key}", _REFUSED_IF_SET[key], "point data_path at images instead")
        if key not in (*_USED, *_REFUSED_IF_SET, *_TOKENIZER_ONLY):
            raise DataConfigError(file, f"{where}.{key}", f"not an argument of {kind}", "check the spelling")
    process = entry.get("image_process", "crop2square")  # CaptionDataset's default
    if process not in IMAGE_PROCESSES:
        raise DataConfigError(
            file,
            f"{where}.image_process",
            f"{process!r} is not supported here",
            f"use one of {', '.join(IMAGE_PROCESSES)}",
        )
    image_size, unit = entry.get("image_size", 256), entry.get("unit_image_size", SIDE_MULTIPLE)
    for key, value in (("image_size", image_size), ("unit_image_size", unit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataConfigError(file, f"{where}.{key}", f"must be a positive integer, got {value!r}", "")
    weight = entry.get("sample_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise DataConfigError(file, f"{where}.sample_weight", f"must be a number > 0, got {weight!r}", "")
    data_path = entry.get("data_path")
    if not isinstance(data_path, str) or not data_path:
        raise DataConfigError(file, f"{where}.data_path", "missing", "set data_path to a .json file or a folder")
    image_folder = entry.get("image_folder")
    if kind == "CaptionDataset" and image_folder is None:
        raise DataConfigError(file, f"{where}.image_folder", "needed (the original read such images from ceph)",
                              "copy the images locally and set image_folder")  # fmt: skip
    records = _records(Path(data_path), file, where)
    items, missing = [], 0
    for k, record in enumerate(records):
        item = _item(kind, entry, record, file, f"{where}: {data_path}[{k}]")
        if item.image_path.is_file():
            items.append(item)
        else:
            missing += 1
    if missing:
        log.warning("%s %s: %d of %d images not found, left out", file, where, missing, len(records))
    if not items:
        raise DataConfigError(
            file, f"{where}.data_path", f"no image of {data_path} exists", "check DATA_ROOT and image_folder"
        )
    name = Path(data_path).stem
    # WeightedInfiniteSampler: per-record weight w, so the dataset's mass is w × its size.
    return SftAuxDataset(name, Path(data_path), tuple(items), float(weight) * len(items), process, image_size, unit)


def _records(data_path: Path, file: Path, where: str) -> list[Any]:
    if data_path.suffix == ".json":
        files = [data_path]
    elif data_path.is_dir():
        files = sorted(data_path.glob("*.json"))
    else:
        files = []
    if not files or not all(f.is_file() for f in files):
        raise DataConfigError(file, f"{where}.data_path", f"{data_path}: no .json file", "check DATA_ROOT")
    records: list[Any] = []
    for json_file in files:
        try:
            loaded = json.loads(json_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataConfigError(json_file, "", f"invalid JSON ({exc})", "write a JSON array of records") from exc
        if not isinstance(loaded, list):
            raise DataConfigError(
                json_file, "", "must hold a JSON array of records", '[{"image_path": ..., "txt": ...}]'
            )
        records += loaded
    return records


def _item(kind: str, entry: Mapping[str, Any], record: Any, file: Path, where: str) -> ImageCaption:
    keys = ("image_path", "txt") if kind == "BLIP3oDataset" else ("image", "annotation")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in keys):
        raise DataConfigError(file, where, f"a {kind} record needs string fields {' and '.join(keys)}", "")
    folder = entry.get("image_folder")
    image = Path(folder) / record[keys[0]] if folder is not None else Path(record[keys[0]])
    if kind == "BLIP3oDataset":
        return ImageCaption(image, record["txt"].strip())
    annotation = Path(entry.get("cap_folder") or ".") / record["annotation"]
    try:
        caption = json.loads(annotation.read_text(encoding="utf-8"))[entry.get("cap_source", "caption")]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataConfigError(
            file, where, f"annotation {annotation}: {exc}", "check cap_folder and cap_source"
        ) from exc
    return ImageCaption(image, str(caption).strip())
