"""Prompt data of the trainer: the train YAML (prompt datasets, weights, rewards) and the eval YAML.

Train YAML (``--dataset_config``)::

    sampling_mode: sample_proportional     # or weight_only
    datasets:
      - name: ocr                          # optional, defaults to the file stem; unique
        path: prompts/ocr.txt              # relative to this YAML file
        sample_weight: 1.0                 # optional, default 1.0; >= 0
        rewards: {ocr: 1.0, unifiedreward_think: 0.5}
        # or, as the original DeepGen-RL writes it, a list of one-key maps:
        # rewards:
        #   - ocr: 1.0
        #   - unifiedreward_think: 0.5

- ``sample_proportional``: p(prompt) ∝ its dataset's weight, so a dataset is drawn with probability
  ∝ weight × size (equal weights = every prompt equally likely).
- ``weight_only``: p(dataset) ∝ weight regardless of its size; prompts uniform within a dataset.

Eval YAML (``--eval_dataset_config``, the original DeepGen-RL's format)::

    datasets:
      - name: unigenbench_en                    # metrics and folders are named after it
        path: unigenbench/test_prompts_en.csv   # scored: names the eval-unigenbench set (stem without
                                                # test_prompts_: "en"); else a prompt file read here
        scoring: unigenbench/en                 # unigenbench, unigenbench/en, unigenbench/zh, or
                                                # {type: unigenbench, language: zh}; leave it out to
                                                # generate and log the images only
        cfg_scale: 4.0                          # optional, default --eval_cfg_scale
        num_inference_steps: 50                 # optional, default --eval_num_inference_steps
        duplicates: 4                           # optional, images per prompt, default 1

A scored entry's file lives with eval-unigenbench (``BENCHMARK=test_prompts_en,...`` serves it); the
trainer asks the service for that set, and a set the service does not serve stops the run at start.

Prompt files: ``.txt`` (one prompt per line, blank lines skipped), ``.jsonl`` (a ``prompt`` or
``caption`` key per line), ``.csv`` and ``.parquet`` (a ``prompt`` or ``caption`` column). Empty
prompts are skipped in every format.

Every problem is found at load time, and the `DataConfigError` names the file, the key (e.g.
``datasets[1].rewards.ocrr``) and the fix. The valid reward names and evaluator names are parameters
of the loaders: this module does not know which reward services exist.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml

SamplingMode = Literal["sample_proportional", "weight_only"]
SAMPLING_MODES: tuple[str, ...] = get_args(SamplingMode)
PROMPT_FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv", ".parquet")
# The keys that may hold the prompt in .jsonl/.csv/.parquet files, in order of preference.
PROMPT_KEYS: tuple[str, ...] = ("prompt", "caption")
SCORING_LANGUAGES: tuple[str, ...] = ("en", "zh")
SCORING_NAMES: tuple[str, ...] = ("unigenbench", "unigenbench/en", "unigenbench/zh")
UNIGENBENCH_FILE_PREFIX = "test_prompts_"
EVAL_DEFAULT_DUPLICATES = 1


class DataConfigError(ValueError):
    """A data config or data file that cannot be used. The message names the file, the key and the fix."""

    def __init__(self, file: Path | str, key: str, problem: str, fix: str = "") -> None:
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem + (f"; {fix}" if fix else ""))
        self.file = str(file)
        self.key = key


@dataclass(frozen=True)
class PromptDataset:
    """One train dataset: its prompts, sampling weight and reward weights (reward name → weight)."""

    name: str
    path: Path
    prompts: tuple[str, ...]
    sample_weight: float
    rewards: Mapping[str, float]


@dataclass(frozen=True)
class TrainData:
    """The loaded train YAML; a prompt's dataset index is its dataset's position in ``datasets``."""

    sampling_mode: SamplingMode
    datasets: tuple[PromptDataset, ...]

    @property
    def reward_names(self) -> tuple[str, ...]:
        """Every reward name some dataset uses, in order of first appearance."""
        return tuple(dict.fromkeys(name for d in self.datasets for name in d.rewards))

    def dataset_probabilities(self) -> tuple[float, ...]:
        """Probability that one draw comes from each dataset (sums to 1).

        sample_proportional: ∝ weight × size; weight_only: ∝ weight.
        """
        if self.sampling_mode == "sample_proportional":
            mass = [d.sample_weight * len(d.prompts) for d in self.datasets]
        else:
            mass = [d.sample_weight for d in self.datasets]
        total = math.fsum(mass)
        return tuple(m / total for m in mass)

    def reward_weights(self, dataset_index: int, names: Sequence[str]) -> tuple[float, ...]:
        """Reward-weight vector (K,) of a prompt of dataset ``dataset_index`` over ``names`` (0.0 = unused)."""
        rewards = self.datasets[dataset_index].rewards
        return tuple(float(rewards.get(name, 0.0)) for name in names)

    def reward_weight_matrix(self, dataset_indices: Sequence[int], names: Sequence[str]) -> torch.Tensor:
        """Reward weights (N, K) float32 of N prompts given their dataset indices, columns in ``names`` order.

        This is the ``weights`` argument of `deepgen_trainer.algorithms.advantages.compute_advantages` (repeat
        each row ``rollout_n`` times for the images of a prompt).
        """
        rows = [self.reward_weights(i, names) for i in dataset_indices]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(names))


@dataclass(frozen=True)
class EvalDataset:
    """One eval entry.

    benchmark: the eval-unigenbench set that scores it (``test_prompts_en.csv`` → ``en``), None when
        it is not scored (generate and log only); language: the judge language ``scoring`` names.
    prompts, prompt_ids: the prompts of an unscored entry (ids: the ``index`` column, else the 0-based
        position); empty for a scored one, whose prompts the service lists.
    cfg_scale, num_inference_steps: None = ``--eval_cfg_scale`` / ``--eval_num_inference_steps``.
    """

    name: str
    path: Path
    benchmark: str | None
    language: str | None
    prompts: tuple[str, ...]
    prompt_ids: tuple[str, ...]
    cfg_scale: float | None = None
    num_inference_steps: int | None = None
    duplicates: int = EVAL_DEFAULT_DUPLICATES


@dataclass(frozen=True)
class EvalData:
    datasets: tuple[EvalDataset, ...]


# ---------------------------------------------------------------------------------------------- prompt files


def read_prompts(path: Path | str) -> tuple[str, ...]:
    """The non-empty prompts of a ``.txt``/``.jsonl``/``.csv``/``.parquet`` file, stripped, in file order."""
    return tuple(prompt for _, prompt in read_prompt_records(path))


def read_prompt_records(path: Path | str) -> list[tuple[str, str]]:
    """(prompt id, prompt) pairs of a prompt file. The id is the ``index`` column/key when the file has
    one (UniGenBench CSVs), else the prompt's 0-based position among the file's non-empty prompts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise DataConfigError(
            path, "", f"unsupported prompt file type {suffix!r}", f"use one of {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise DataConfigError(path, "", "file not found", "check the path (relative paths start at the YAML's folder)")
    if suffix == ".txt":
        rows: list[tuple[str | None, str]] = [
            (None, line) for line in path.read_text(encoding="utf-8-sig").splitlines()
        ]
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        rows = _parquet_rows(path)
    records: list[tuple[str, str]] = []
    for row_id, prompt in rows:
        prompt = prompt.strip()
        if prompt:
            records.append((row_id if row_id is not None else str(len(records)), prompt))
    return records


def _prompt_key(keys: Collection[str], path: Path, where: str) -> str:
    for key in PROMPT_KEYS:
        if key in keys:
            return key
    raise DataConfigError(
        path,
        where,
        f"no prompt field (found: {', '.join(sorted(keys)) or 'none'})",
        "add a 'prompt' or 'caption' field",
    )


def jsonl_records(path: Path, example: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("line N", record) for each non-blank line of a JSON Lines file; a line that is not a JSON object
    is a `DataConfigError` whose fix shows `example`, a record of the expected form."""
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataConfigError(path, where, f"invalid JSON ({e.msg})", "write one JSON object per line") from e
        if not isinstance(record, dict):
            raise DataConfigError(path, where, "not a JSON object", f"write objects like {example}")
        yield where, record


def _jsonl_rows(path: Path) -> list[tuple[str | None, str]]:
    rows: list[tuple[str | None, str]] = []
    for where, record in jsonl_records(path, '{"prompt": "..."}'):
        key = _prompt_key(record.keys(), path, where)
        if not isinstance(record[key], str):
            raise DataConfigError(path, f"{where}.{key}", "must be a string", "store the prompt as a JSON string")
        row_id = record.get("index")
        rows.append((None if row_id is None else str(row_id), record[key]))
    return rows


def _csv_rows(path: Path) -> list[tuple[str | None, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        key = _prompt_key(reader.fieldnames or (), path, "header")
        has_index = "index" in (reader.fieldnames or ())
        return [(row["index"].strip() if has_index else None, row[key] or "") for row in reader]


def _parquet_rows(path: Path) -> list[tuple[str | None, str]]:
    import pyarrow.parquet as pq  # only .parquet prompt files need pyarrow

    names = pq.read_schema(path).names
    key = _prompt_key(names, path, "columns")
    columns = [key, "index"] if "index" in names else [key]
    table = pq.read_table(path, columns=columns).to_pydict()
    prompts = ["" if p is None else str(p) for p in table[key]]
    ids = [str(i) for i in table["index"]] if "index" in table else [None] * len(prompts)
    return list(zip(ids, prompts, strict=True))


# ----------------------------------------------------------------------------------------------- YAML checks


def load_yaml_mapping(path: Path | str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(path, "", "config file not found", "pass an existing YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataConfigError(path, "", f"invalid YAML: {e}", "fix the YAML syntax") from e
    if not isinstance(loaded, dict):
        raise DataConfigError(path, "", "the top level must be a mapping", "start the file with 'datasets:'")
    return loaded


def check_keys(
    mapping: Mapping[str, Any], allowed: Collection[str], required: Collection[str], file: Path, where: str
) -> None:
    """Unknown keys and missing required keys are errors naming the key and the valid ones."""
    prefix = f"{where}." if where else ""
    for key in mapping:
        if key not in allowed:
            raise DataConfigError(
                file, f"{prefix}{key}", "unknown key", f"valid keys: {', '.join(sorted(allowed))} (check the spelling)"
            )
    for key in required:
        if key not in mapping:
            raise DataConfigError(file, f"{prefix}{key}", "missing", f"add '{key}:'")


def dataset_list(raw: Mapping[str, Any], file: Path) -> list[dict[str, Any]]:
    """The non-empty ``datasets:`` list of mappings."""
    items = raw.get("datasets")
    if not isinstance(items, list) or not items:
        raise DataConfigError(file, "datasets", "must be a non-empty list", "list at least one dataset")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataConfigError(file, f"datasets[{i}]", "must be a mapping", "write '- name: ...' entries")
    return items


def non_negative_number(value: Any, file: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataConfigError(file, key, f"must be a finite number, got {value!r}", "write a number such as 1.0")
    if value < 0:
        raise DataConfigError(file, key, f"must be >= 0, got {value}", "use 0 to disable, or a positive weight")
    return float(value)


def positive_int(value: Any, file: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataConfigError(file, key, f"must be an integer >= 1, got {value!r}", "write a positive integer")
    return value


def resolve_path(value: Any, file: Path, key: str) -> Path:
    """A path relative to the config file's folder (absolute paths are kept)."""
    if not isinstance(value, str) or not value:
        raise DataConfigError(file, key, f"must be a path string, got {value!r}", "write the path as a string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else file.parent / path


def unique_name(item: Mapping[str, Any], path: Path, seen: set[str], file: Path, where: str) -> str:
    name = item.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise DataConfigError(file, f"{where}.name", f"must be a non-empty string, got {name!r}", "name the dataset")
    if name in seen:
        raise DataConfigError(file, f"{where}.name", f"duplicate dataset name {name!r}", "give each dataset its name")
    seen.add(name)
    return name


def _load_prompts(path: Path, file: Path, where: str) -> list[tuple[str, str]]:
    try:
        records = read_prompt_records(path)
    except DataConfigError as e:
        # Re-raise with the YAML file and key in front: the user edits the YAML, not the prompt file.
        raise DataConfigError(file, f"{where}.path", str(e), "") from e
    if not records:
        raise DataConfigError(file, f"{where}.path", f"{path} holds no prompts", "point at a non-empty prompt file")
    return records


# --------------------------------------------------------------------------------------------- train / eval


_TRAIN_TOP_KEYS = ("sampling_mode", "datasets")
_TRAIN_DATASET_KEYS = ("name", "path", "sample_weight", "rewards")


def load_train_data(path: Path | str, reward_names: Collection[str]) -> TrainData:
    """Load and check the train YAML. ``reward_names`` is the set of rewards the trainer can compute."""
    file = Path(path)
    raw = load_yaml_mapping(file)
    check_keys(raw, _TRAIN_TOP_KEYS, ("datasets",), file, "")
    mode = raw.get("sampling_mode", "sample_proportional")
    if mode not in SAMPLING_MODES:
        raise DataConfigError(
            file, "sampling_mode", f"unknown mode {mode!r}", f"valid modes: {', '.join(SAMPLING_MODES)}"
        )
    datasets: list[PromptDataset] = []
    seen: set[str] = set()
    for i, item in enumerate(dataset_list(raw, file)):
        where = f"datasets[{i}]"
        check_keys(item, _TRAIN_DATASET_KEYS, ("path", "rewards"), file, where)
        prompt_path = resolve_path(item["path"], file, f"{where}.path")
        name = unique_name(item, prompt_path, seen, file, where)
        weight = non_negative_number(item.get("sample_weight", 1.0), file, f"{where}.sample_weight")
        rewards = _reward_weights(item["rewards"], reward_names, file, f"{where}.rewards")
        records = _load_prompts(prompt_path, file, where)
        prompts = tuple(p for _, p in records)
        datasets.append(PromptDataset(name, prompt_path, prompts, weight, rewards))
    if all(d.sample_weight == 0 for d in datasets):
        raise DataConfigError(file, "datasets[*].sample_weight", "every weight is 0", "give one dataset a weight > 0")
    return TrainData(sampling_mode=mode, datasets=tuple(datasets))


def simple_train_data(prompts_file: Path | str, reward_names: Sequence[str]) -> TrainData:
    """The original's simple mode (``--prompts_file`` + ``--reward_funcs``, no train YAML): one dataset,
    every prompt of the file, each reward with weight 1."""
    path = Path(prompts_file)
    records = read_prompt_records(path)
    if not records:
        raise DataConfigError(path, "", "holds no prompts", "point --prompts_file at a non-empty prompt file")
    dataset = PromptDataset(path.stem, path, tuple(p for _, p in records), 1.0, dict.fromkeys(reward_names, 1.0))
    return TrainData(sampling_mode="sample_proportional", datasets=(dataset,))


def _reward_weights(raw: Any, known: Collection[str], file: Path, where: str) -> dict[str, float]:
    valid = f"valid reward names: {', '.join(sorted(known))}"
    if isinstance(raw, list) and raw:
        raw = _merge_reward_list(raw, file, where)
    if not isinstance(raw, dict) or not raw:
        raise DataConfigError(
            file, where, "must be a non-empty mapping of reward name to weight, or a list of one-key maps", valid
        )
    rewards: dict[str, float] = {}
    for name, weight in raw.items():
        if name not in known:
            raise DataConfigError(file, f"{where}.{name}", "unknown reward", valid)
        rewards[name] = non_negative_number(weight, file, f"{where}.{name}")
    if all(w == 0 for w in rewards.values()):
        raise DataConfigError(file, where, "every reward weight is 0", "give one reward a weight > 0")
    return rewards


def _merge_reward_list(items: list[Any], file: Path, where: str) -> dict[str, Any]:
    """The original's list form (``- ocr: 0.7``) as one mapping. Where the original ignored a
    non-mapping item and let a repeated name overwrite the earlier one, both are errors here."""
    merged: dict[str, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            raise DataConfigError(
                file,
                f"{where}[{i}]",
                f"must be a one-key map such as '- ocr: 0.7', got {item!r}",
                "write one reward per item",
            )
        ((name, weight),) = item.items()
        if name in merged:
            raise DataConfigError(file, f"{where}[{i}].{name}", "listed twice", "keep one weight per reward")
        merged[name] = weight
    return merged


_EVAL_TOP_KEYS = ("datasets",)
_EVAL_DATASET_KEYS = ("name", "path", "cfg_scale", "num_inference_steps", "duplicates", "scoring")


def load_eval_data(path: Path | str) -> EvalData:
    """Load and check the eval YAML (the original's format, see the module docstring)."""
    file = Path(path)
    raw = load_yaml_mapping(file)
    check_keys(raw, _EVAL_TOP_KEYS, ("datasets",), file, "")
    datasets: list[EvalDataset] = []
    seen: set[str] = set()
    for i, item in enumerate(dataset_list(raw, file)):
        where = f"datasets[{i}]"
        check_keys(item, _EVAL_DATASET_KEYS, ("path",), file, where)
        prompt_path = resolve_path(item["path"], file, f"{where}.path")
        name = unique_name(item, prompt_path, seen, file, where)
        language = _scoring_language(item.get("scoring"), file, f"{where}.scoring")
        cfg_scale = item.get("cfg_scale")
        if cfg_scale is not None:
            cfg_scale = non_negative_number(cfg_scale, file, f"{where}.cfg_scale")
        steps = item.get("num_inference_steps")
        if steps is not None:
            steps = positive_int(steps, file, f"{where}.num_inference_steps")
        duplicates = positive_int(item.get("duplicates", EVAL_DEFAULT_DUPLICATES), file, f"{where}.duplicates")
        prompts: tuple[str, ...] = ()
        ids: tuple[str, ...] = ()
        benchmark = None
        if language is None:  # generate only: the trainer reads the prompts
            records = _load_prompts(prompt_path, file, where)
            ids = tuple(i for i, _ in records)
            if len(set(ids)) != len(ids):
                raise DataConfigError(file, f"{where}.path", "duplicate prompt ids", "make the 'index' column unique")
            prompts = tuple(p for _, p in records)
        else:  # scored: eval-unigenbench serves the set the file names (test_prompts_en.csv: set "en")
            benchmark = prompt_path.stem.removeprefix(UNIGENBENCH_FILE_PREFIX)
        datasets.append(EvalDataset(name, prompt_path, benchmark, language, prompts, ids, cfg_scale, steps, duplicates))
    return EvalData(datasets=tuple(datasets))


def _scoring_language(raw: Any, file: Path, where: str) -> str | None:
    """The judge language of ``scoring`` (None: not scored). Accepts the original's forms: a string
    ``unigenbench`` / ``unigenbench/<lang>``, a dict ``{type: ..., language: ...}``, or a list of those."""
    if raw is None:
        return None
    if isinstance(raw, list):
        if len(raw) != 1:
            raise DataConfigError(file, where, f"lists {len(raw)} scorers", "give one scorer per dataset")
        return _scoring_language(raw[0], file, f"{where}[0]")
    language = None
    if isinstance(raw, dict):
        check_keys(raw, ("type", "language"), ("type",), file, where)
        kind, language = raw["type"], raw.get("language")
    else:
        kind = raw
    if not isinstance(kind, str) or kind.split("/")[0] != "unigenbench" or kind.count("/") > 1:
        raise DataConfigError(
            file, where, f"unknown scorer {raw!r}",
            f"use one of {', '.join(SCORING_NAMES)}, or leave scoring out to generate and log the images only",
        )  # fmt: skip
    if "/" in kind:  # the original: the type's language wins over a language key
        language = kind.split("/")[1]
    language = language or "en"
    if language not in SCORING_LANGUAGES:
        raise DataConfigError(file, where, f"unknown language {language!r}", f"use {' or '.join(SCORING_LANGUAGES)}")
    return language
