"""Image-caption data of the SFT auxiliary loss (``--sftaux_dataset_config``).

YAML::

    resolution: 512            # optional: images are resized to about resolution² pixels (default 512)
    empty_caption_prob: 0.1    # optional: fraction of captions replaced by "" (default 0.1)
    datasets:
      - name: laion_subset     # optional, defaults to the path's stem; unique
        path: sft/captions.jsonl   # relative to this YAML: a .jsonl or a folder
        sample_weight: 1.0     # optional, default 1.0; p(dataset) ∝ weight

A ``.jsonl`` has one ``{"image": "<path relative to the .jsonl>", "caption": "..."}`` per line
(``image_path``/``file_name`` and ``prompt``/``text`` are accepted too). A folder holds images
(``.png``/``.jpg``/``.jpeg``/``.webp``/``.bmp``), each with a caption in the ``.txt`` file of the same
stem. Every image must exist at load time; pixels are read lazily.

`SftAuxLoader` yields (image, caption) pairs: a dataset is drawn ∝ its weight, then an image uniformly.
The image keeps its aspect ratio and is resized to about ``resolution²`` pixels with both sides
multiples of 32 (resize to cover, then centre-crop the few rounding pixels). Draw n of a rank comes
from its own seed (seed, rank, n), so the stream is deterministic, and resuming is just restoring n.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from deepgen_trainer.data.prompts import (
    DataConfigError,
    check_keys,
    dataset_list,
    jsonl_records,
    load_yaml_mapping,
    non_negative_number,
    positive_int,
    resolve_path,
    unique_name,
)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDE_MULTIPLE = 32
DEFAULT_RESOLUTION = 512
DEFAULT_EMPTY_CAPTION_PROB = 0.1
_IMAGE_KEYS = ("image", "image_path", "file_name")
_CAPTION_KEYS = ("caption", "prompt", "text")


@dataclass(frozen=True)
class ImageCaption:
    image_path: Path
    caption: str


# How a dataset's images are sized: ``cover_crop`` is this YAML's (about resolution² pixels, cover and
# centre-crop, a batch cropped to its first image's size); the others are the original DeepGen-RL's
# ``image_process`` values (`data.sftaux_mmengine`), which keep each image's own size.
ImageProcess = Literal["cover_crop", "fix_pixels", "dynamic", "resize2square"]


@dataclass(frozen=True)
class SftAuxDataset:
    """One dataset. ``sample_weight`` is the dataset's probability mass (p(dataset) ∝ it); ``image_size``
    and ``unit_image_size`` parameterise the original's ``image_process`` values."""

    name: str
    path: Path
    items: tuple[ImageCaption, ...]
    sample_weight: float
    image_process: ImageProcess = "cover_crop"
    image_size: int = DEFAULT_RESOLUTION
    unit_image_size: int = SIDE_MULTIPLE


@dataclass(frozen=True)
class SftAuxData:
    datasets: tuple[SftAuxDataset, ...]
    resolution: int = DEFAULT_RESOLUTION
    empty_caption_prob: float = DEFAULT_EMPTY_CAPTION_PROB


_TOP_KEYS = ("resolution", "empty_caption_prob", "datasets")
_DATASET_KEYS = ("name", "path", "sample_weight")


def load_sftaux_data(path: Path | str) -> SftAuxData:
    """Load and check the SFT-aux YAML; every image path is checked to exist."""
    file = Path(path)
    raw = load_yaml_mapping(file)
    check_keys(raw, _TOP_KEYS, ("datasets",), file, "")
    resolution = positive_int(raw.get("resolution", DEFAULT_RESOLUTION), file, "resolution")
    if resolution < SIDE_MULTIPLE:
        raise DataConfigError(file, "resolution", f"must be >= {SIDE_MULTIPLE}, got {resolution}", "use e.g. 512")
    empty_prob = non_negative_number(
        raw.get("empty_caption_prob", DEFAULT_EMPTY_CAPTION_PROB), file, "empty_caption_prob"
    )
    if empty_prob > 1:
        raise DataConfigError(file, "empty_caption_prob", f"must be <= 1, got {empty_prob}", "use e.g. 0.1")
    datasets: list[SftAuxDataset] = []
    seen: set[str] = set()
    for i, item in enumerate(dataset_list(raw, file)):
        where = f"datasets[{i}]"
        check_keys(item, _DATASET_KEYS, ("path",), file, where)
        data_path = resolve_path(item["path"], file, f"{where}.path")
        name = unique_name(item, data_path, seen, file, where)
        weight = non_negative_number(item.get("sample_weight", 1.0), file, f"{where}.sample_weight")
        try:
            items = _read_items(data_path)
        except DataConfigError as e:
            raise DataConfigError(file, f"{where}.path", str(e)) from e
        if not items:
            raise DataConfigError(file, f"{where}.path", f"{data_path} holds no images", "point at a non-empty dataset")
        datasets.append(SftAuxDataset(name, data_path, tuple(items), weight))
    if all(d.sample_weight == 0 for d in datasets):
        raise DataConfigError(file, "datasets[*].sample_weight", "every weight is 0", "give one dataset a weight > 0")
    return SftAuxData(tuple(datasets), resolution, empty_prob)


def _read_items(path: Path) -> list[ImageCaption]:
    if path.is_dir():
        return _folder_items(path)
    if path.suffix.lower() == ".jsonl" and path.is_file():
        return _jsonl_items(path)
    if not path.exists():
        raise DataConfigError(path, "", "not found", "check the path (relative paths start at the YAML's folder)")
    raise DataConfigError(
        path, "", "unsupported dataset", "use a .jsonl of image/caption records or a folder of images"
    )


def _jsonl_items(path: Path) -> list[ImageCaption]:
    items = []
    for where, record in jsonl_records(path, '{"image": "...", "caption": "..."}'):
        image = _field(record, _IMAGE_KEYS, path, where)
        caption = _field(record, _CAPTION_KEYS, path, where)
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise DataConfigError(path, where, f"image {image_path} not found", "paths are relative to the .jsonl")
        items.append(ImageCaption(image_path, caption.strip()))
    return items


def _field(record: Mapping[str, Any], keys: tuple[str, ...], path: Path, where: str) -> str:
    for key in keys:
        if isinstance(record.get(key), str):
            return record[key]
    raise DataConfigError(path, where, f"no string field among {', '.join(keys)}", f"add a '{keys[0]}' field")


def _folder_items(folder: Path) -> list[ImageCaption]:
    items = []
    for image_path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_path = image_path.with_suffix(".txt")
        if not caption_path.is_file():
            raise DataConfigError(
                image_path, "", "no caption", f"write the caption to {caption_path.name} or remove the image"
            )
        items.append(ImageCaption(image_path, caption_path.read_text(encoding="utf-8-sig").strip()))
    return items


def target_size(width: int, height: int, resolution: int = DEFAULT_RESOLUTION) -> tuple[int, int]:
    """(width, height) with about resolution² pixels, the aspect ratio of (width, height), sides multiples of 32."""
    aspect = width / height
    area = resolution * resolution
    w = max(SIDE_MULTIPLE, round(math.sqrt(area * aspect) / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    h = max(SIDE_MULTIPLE, round(math.sqrt(area / aspect) / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    return w, h


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The image at ``path`` as a (3, H, W) float32 tensor in [-1, 1], ``size`` = (W, H).

    Resized (bicubic) to cover ``size`` keeping its aspect ratio, then centre-cropped.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = (max(w, math.ceil(image.width * scale)), max(h, math.ceil(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
    image = image.crop((left, top, left + w, top + h))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def original_image(path: Path, process: ImageProcess, image_size: int, unit: int) -> torch.Tensor:
    """The image at ``path`` sized as the original DeepGen-RL's ``image_process`` sizes it (its own size
    kept), as a (3, H, W) float32 tensor in [-1, 1]:

    - ``fix_pixels``: r = image_size / √(h·w); sides ⌈side·r / unit⌉·unit (about image_size² pixels);
    - ``dynamic``: the longer side image_size when it is larger, the other ⌈·/unit⌉·unit; smaller
      images only rounded up to multiples of unit;
    - ``resize2square``: image_size × image_size.
    Resized with PIL's default filter (bicubic), no crop, as the original.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    w, h = image.size
    if process == "fix_pixels":
        ratio = image_size / math.sqrt(h * w)
        size = (math.ceil(w * ratio / unit) * unit, math.ceil(h * ratio / unit) * unit)
    elif process == "dynamic":
        if w >= h and w >= image_size:
            size = (image_size, math.ceil(h * image_size / w / unit) * unit)
        elif h >= w and h >= image_size:
            size = (math.ceil(w * image_size / h / unit) * unit, image_size)
        else:
            size = (math.ceil(w / unit) * unit, math.ceil(h / unit) * unit)
    elif process == "resize2square":
        size = (image_size, image_size)
    else:
        raise ValueError(f"image_process {process!r} is not one of the original's: fix_pixels, dynamic, resize2square")
    pixels = torch.from_numpy(np.asarray(image.resize(size), dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


class SftAuxLoader:
    """Infinite, deterministic stream of (image (3, H, W) float32 in [-1, 1], caption) for one rank.
    ``num_workers`` threads decode a batch's images in parallel (0: in the caller's thread)."""

    def __init__(self, data: SftAuxData, seed: int, rank: int = 0, num_workers: int = 0) -> None:
        self.data = data
        self.seed = seed
        self.rank = rank
        self.position = 0
        weights = np.array([d.sample_weight for d in data.datasets], dtype=np.float64)
        self._probs = weights / weights.sum()
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="sftaux") if num_workers > 0 else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, str]:
        (image,), (caption,) = self.next_images(1)
        return image, caption

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """(images (B, 3, H, W), captions) of same-sized images (`next_images` of a YAML-configured set)."""
        images, captions = self.next_images(batch_size)
        return torch.stack(images), captions

    def next_images(self, batch_size: int) -> tuple[list[torch.Tensor], list[str]]:
        """The next ``batch_size`` (image (3, H, W), caption) pairs. ``cover_crop`` images take the size of
        the batch's first one (cropped to it); the original's ``image_process`` keeps each image's size."""
        draws = [self._draw(self.position + k) for k in range(batch_size)]
        self.position += batch_size
        first_size = None
        if draws[0][0].image_process == "cover_crop":
            with Image.open(draws[0][1].image_path) as image:
                first_size = target_size(image.width, image.height, self.data.resolution)

        def load(draw: tuple[SftAuxDataset, ImageCaption, bool]) -> torch.Tensor:
            dataset, item, _ = draw
            if dataset.image_process == "cover_crop":
                if first_size is None:  # a YAML set after an original-format one: its own target size
                    with Image.open(item.image_path) as image:
                        return load_image(item.image_path, target_size(image.width, image.height, self.data.resolution))
                return load_image(item.image_path, first_size)
            return original_image(item.image_path, dataset.image_process, dataset.image_size, dataset.unit_image_size)

        images = list(self._pool.map(load, draws)) if self._pool is not None else [load(d) for d in draws]
        return images, ["" if empty else item.caption for _, item, empty in draws]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _draw(self, n: int) -> tuple[SftAuxDataset, ImageCaption, bool]:
        # One generator per draw: the stream is a pure function of (seed, rank, n), so a checkpoint
        # only needs n.
        rng = np.random.default_rng([self.seed, self.rank, n])
        dataset = self.data.datasets[int(rng.choice(len(self._probs), p=self._probs))]
        item = dataset.items[int(rng.integers(len(dataset.items)))]
        return dataset, item, bool(rng.random() < self.data.empty_caption_prob)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"SFT-aux loader state has seed {state['seed']}, this run {self.seed}; resume with --seed")
        self.position = int(state["position"])
