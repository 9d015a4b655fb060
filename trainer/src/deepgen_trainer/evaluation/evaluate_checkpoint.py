"""`make eval CKPT=...`: UniGenBench evaluation of a trained checkpoint outside the training loop.

    python -m deepgen_trainer.evaluation.evaluate_checkpoint outputs/run1 --sets en,zh --baseline outputs/sft-eval

`CKPT` is an RL run folder (its latest complete checkpoint), a `checkpoint-<step>` folder, or a converted
`.pth` (`make convert`). The images are generated as the training evaluation generates them: ODE
sampling, `--eval_cfg_scale`, per-image seeds index·1000 + duplicate + 42; for an RL checkpoint the
model, sizes, steps and guidance come from the run's saved config (flags override them). Each set is
judged by eval-unigenbench (`UNIGENBENCH_API_URL`), which must serve it (`BENCHMARK` lists the sets).

Per set, `OUTPUT_DIR/<set>/` holds `images/<prompt_id>_<duplicate>.png` (the upstream naming),
`verdicts.jsonl` (one line per judged image, appended as each judging run finishes), and at the end
`results.csv`, `summary.json`, `contact_sheet.png` and `table.txt`. An interrupted evaluation resumes:
images on disk are not generated again and judged images are not sent again (only images whose
judging failed with an error are); `OUTPUT_DIR/eval_config.json` pins the generation settings, so a
resume with other settings is refused.

The table per set lists each primary dimension, the Overall score (the mean of the primary dimensions,
as the UniGenBench leaderboard reports it) and the pooled accuracy, beside `--baseline`: a folder
written by an earlier `make eval`, or another checkpoint (evaluated first with the same settings).
`--report_to wandb,swanlab` also logs the `eval/<set>/...` metrics and the contact sheets at the
checkpoint's step (offline runs under `OUTPUT_DIR`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from deepgen_common.client import EvalClient, EvalImage, RewardServiceError, TransientError
from deepgen_common.eval_results import read_summary_json, summarize_results
from deepgen_common.types import ImageResult, RunSummary
from deepgen_trainer.checkpoints.folder_files import CheckpointError, load_json_object
from deepgen_trainer.checkpoints.formats import CheckpointReadError, read_checkpoint
from deepgen_trainer.checkpoints.loading import LoadReport, apply_checkpoint, build_model
from deepgen_trainer.checkpoints.run_checkpoint import CONFIG_FILE, resolve_checkpoint
from deepgen_trainer.config import MODEL_KINDS, ConfigError, TrainConfig, deployment_env
from deepgen_trainer.evaluation.evaluate import (
    CONTACT_SHEET_FILE,
    EvalItem,
    eval_items,
    generate_pngs,
    summary_metrics,
    write_evaluation,
)
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.observe.tracking import Tracker

log = logging.getLogger("deepgen_trainer")

DEFAULT_SETS = ("en",)
SETTINGS_FILE = "eval_config.json"
VERDICTS_FILE = "verdicts.jsonl"
TABLE_FILE = "table.txt"
# The generation settings an evaluation pins (the TrainConfig fields it reads).
GENERATION_FIELDS = ("model", "seed", "image_height", "image_width", "num_inference_steps", "eval_cfg_scale")


@dataclass(frozen=True)
class Source:
    """What `CKPT` names: an RL checkpoint folder (`kind` "rl", its `step`) or a state-dict file ("pth")."""

    kind: Literal["rl", "pth"]
    path: Path
    step: int
    config: TrainConfig


@dataclass(frozen=True)
class Options:
    """How to judge: sets, batch sizes, where."""

    sets: tuple[str, ...]
    url: str
    batch_size: int
    judge_batch: int


def find_source(checkpoint: str, overrides: dict[str, object]) -> Source:
    """The checkpoint and the TrainConfig to build its model with: the run's saved config for an RL
    checkpoint, the defaults for a `.pth`; `overrides` (flags given) win."""
    path = Path(checkpoint)
    if path.is_file():
        return Source("pth", path, 0, TrainConfig(**{"checkpoint": str(path), **overrides}))
    try:
        resolved = resolve_checkpoint(path)
        saved = load_json_object(resolved, resolved / CONFIG_FILE)
    except (CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(f"CKPT {checkpoint}: {exc}; or pass a converted .pth file") from None
    step = int(resolved.name.removeprefix("checkpoint-"))
    try:
        config = TrainConfig.from_dict(saved)
    except (ConfigError, TypeError, ValueError) as exc:  # a stranger's file: any field, any type
        raise ConfigError(f"CKPT {checkpoint}: {resolved / CONFIG_FILE} is not a run configuration: {exc}") from None
    return Source("rl", resolved, step, dataclasses.replace(config, **overrides))


def load_model(source: Source) -> DeepGen:
    """The model `source.config` describes (its `--checkpoint` applied: the SFT weights of an RL run,
    or the `.pth` itself), then an RL checkpoint's DiT and DeepGen-only weights on top; in eval mode
    on the GPU if any."""
    model = build_model(source.config)
    if source.kind == "rl":
        try:
            contents = read_checkpoint(source.path)
        except CheckpointReadError as exc:  # refused (hostile, or pointing outside the folder): exit 2
            raise ConfigError(f"CKPT {source.path}: {exc}") from exc
        report = LoadReport(checkpoint=str(source.path))
        apply_checkpoint(model, contents, report, fallback="from the run's base")
        log.info("checkpoint loaded: %s", report.summary())
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def default_output_dir(source: Source) -> Path:
    """`<run>/eval/checkpoint-<step>` for an RL checkpoint, `<file stem>-eval` beside a `.pth`."""
    if source.kind == "rl":
        return source.path.parent / "eval" / source.path.name
    return source.path.with_name(f"{source.path.stem}-eval")


def pin_settings(output_dir: Path, source: Source) -> None:
    """Write the generation settings to `eval_config.json`, or check them against an earlier run's."""
    settings = {"checkpoint": str(source.path), **{f: getattr(source.config, f) for f in GENERATION_FIELDS}}
    path = output_dir / SETTINGS_FILE
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier != settings:
            changed = sorted(k for k in settings if earlier.get(k) != settings[k])
            raise ConfigError(
                f"{output_dir} holds an evaluation with other settings ({', '.join(changed)}: {earlier} vs "
                f"{settings}); pass another OUT (--output_dir) or delete that folder"
            )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def evaluate_set(
    source: Source, model: _LazyModel, client: EvalClient, set_name: str, folder: Path, options: Options
) -> RunSummary:
    """Generate what is missing, judge what is not judged, then summarise and write the set's files."""
    listed = client.prompts(set_name)
    items = eval_items(listed.prompts, listed.duplicates)
    generate_missing(source, model, items, folder / "images", options.batch_size, set_name)
    verdicts = judge_missing(source, client, items, folder, options.judge_batch, set_name)
    rules = sorted({rules for _, rules in verdicts.values()})
    if len(rules) > 1:
        raise ConfigError(
            f"{folder / VERDICTS_FILE} mixes verdicts read under the answer rules {rules} (the service's "
            "UNIGENBENCH_ANSWER_RULES changed); delete the file to judge the set again under one"
        )
    results = [verdicts[(i.prompt_id, i.duplicate)][0] for i in items if (i.prompt_id, i.duplicate) in verdicts]
    summary = summarize_results(
        f"offline-{set_name}", source.step, results, answer_rules=rules[0] if rules else "", benchmark=set_name
    )
    first = [
        (i.prompt_id, i.prompt, _read_or_none(_image_path(folder / "images", i))) for i in items if i.duplicate == 0
    ]
    write_evaluation(folder, summary, first)
    return summary


def generate_missing(
    source: Source, model: _LazyModel, items: Sequence[EvalItem], images: Path, batch_size: int, set_name: str
) -> None:
    """Generate the images of `items` that are not in `images` yet (each written atomically)."""
    missing = [i for i in items if not _image_path(images, i).exists()]
    if not missing:
        return
    images.mkdir(parents=True, exist_ok=True)
    cfg = source.config
    with tqdm(total=len(items), initial=len(items) - len(missing), desc=f"generate {set_name}") as bar:
        for batch in generate_pngs(
            model.get(), missing, height=cfg.image_height, width=cfg.image_width,
            num_inference_steps=cfg.num_inference_steps, cfg_scale=cfg.eval_cfg_scale, batch_size=batch_size,
        ):  # fmt: skip
            for item, data in batch:
                _write_atomic(_image_path(images, item), data)
            bar.update(len(batch))


def judge_missing(
    source: Source, client: EvalClient, items: Sequence[EvalItem], folder: Path, judge_batch: int, set_name: str
) -> dict[tuple[str, int], tuple[ImageResult, str]]:
    """Send the images without a verdict (or whose judging failed with an error) in runs of `judge_batch`,
    appending each run's verdicts to `verdicts.jsonl`; returns every verdict with its answer rules."""
    path = folder / VERDICTS_FILE
    verdicts = read_verdicts(path)
    todo = [i for i in items if (v := verdicts.get((i.prompt_id, i.duplicate))) is None or v[0].status == "error"]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"judge {set_name}") as bar:
        for start in range(0, len(todo), judge_batch):
            chunk = todo[start : start + judge_batch]
            run = client.start_run(source.step, set_name)
            images = [
                EvalImage(i.prompt_id, i.duplicate, _image_path(folder / "images", i).read_bytes()) for i in chunk
            ]
            client.submit(run, images)
            summary = client.finish(run)
            rows = [{"answer_rules": summary.answer_rules, **dataclasses.asdict(v)} for v in summary.images]
            _append_lines(path, [json.dumps(row, ensure_ascii=False) for row in rows])
            for verdict in summary.images:
                verdicts[(verdict.prompt_id, verdict.duplicate)] = (verdict, summary.answer_rules)
            bar.update(len(chunk))
    return verdicts


def read_verdicts(path: Path) -> dict[tuple[str, int], tuple[ImageResult, str]]:
    """(prompt_id, duplicate) -> (verdict, answer rules) of `verdicts.jsonl`; a torn last line (a crash
    mid-write) is skipped, so that image is judged again."""
    verdicts: dict[tuple[str, int], tuple[ImageResult, str]] = {}
    if not path.exists():
        return verdicts
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rules = row.pop("answer_rules")
        verdict = ImageResult(**row)
        verdicts[(verdict.prompt_id, verdict.duplicate)] = (verdict, rules)
    return verdicts


def format_table(set_name: str, summary: RunSummary, baseline: RunSummary | None) -> str:
    """Accuracies (%) per primary dimension, Overall (mean of the primary dimensions) and pooled, with
    the baseline and the difference when given."""
    columns = ["checkpoint"] + (["baseline", "delta"] if baseline is not None else [])
    rows: list[tuple[str, float, float]] = []
    base = {d.name: d.accuracy for d in baseline.primary_dimensions} if baseline is not None else {}
    own = {d.name: d.accuracy for d in summary.primary_dimensions}
    for name in sorted(set(own) | set(base)):
        rows.append((name, own.get(name, math.nan), base.get(name, math.nan)))
    rows.append(
        (
            "Overall (mean of primary)",
            summary.primary_mean_accuracy,
            baseline.primary_mean_accuracy if baseline else math.nan,
        )
    )
    rows.append(
        ("Pooled (all testpoints)", summary.overall_accuracy, baseline.overall_accuracy if baseline else math.nan)
    )
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"UniGenBench {set_name}: {summary.images_judged} images judged, {summary.parse_failures} parse failures, "
        f"{summary.errors} errors ({summary.answer_rules or 'unknown'} answer rules)",
        "dimension".ljust(width) + "".join(c.rjust(12) for c in columns),
    ]
    for name, value, base_value in rows:
        cells = [_percent(value)]
        if baseline is not None:
            cells += [_percent(base_value), _percent(value - base_value, signed=True)]
        lines.append(name.ljust(width) + "".join(c.rjust(12) for c in cells))
    return "\n".join(lines) + "\n"


def evaluate_checkpoint(source: Source, output_dir: Path, options: Options) -> dict[str, RunSummary]:
    """Evaluate `source` on every set of `options` into `output_dir`; the summaries by set."""
    pin_settings(output_dir, source)
    model = _LazyModel(source)
    summaries = {}
    with EvalClient(options.url) as client:
        for set_name in options.sets:
            summaries[set_name] = evaluate_set(source, model, client, set_name, output_dir / set_name, options)
    return summaries


def baseline_summaries(
    baseline: str, sets: Sequence[str], options: Options, overrides: dict[str, object]
) -> dict[str, RunSummary]:
    """The baseline's summaries: read from an earlier evaluation's folder, else evaluated (a checkpoint)."""
    folder = Path(baseline)
    if (folder / SETTINGS_FILE).exists():
        missing = [s for s in sets if not (folder / s / "summary.json").exists()]
        if missing:
            raise ConfigError(
                f"BASELINE {folder} has no evaluation of {', '.join(missing)}: evaluate it with SETS={','.join(sets)}"
            )
        return {s: read_summary_json(folder / s / "summary.json") for s in sets}
    source = find_source(baseline, overrides)
    return evaluate_checkpoint(source, default_output_dir(source), options)


class _LazyModel:
    """Builds the model on first use: a fully generated evaluation that resumes only to judge never loads it."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._model: DeepGen | None = None

    def get(self) -> DeepGen:
        if self._model is None:
            self._model = load_model(self.source)
        return self._model


def _image_path(folder: Path, item: EvalItem) -> Path:
    return folder / f"{item.prompt_id}_{item.duplicate}.png"


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append `lines` to `path`, first ending a line torn by a crash so the new ones stay whole."""
    with path.open("a+b") as file:
        if file.tell() > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")
        file.write("".join(line + "\n" for line in lines).encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def _percent(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = deployment_env(environ)
    parser = argparse.ArgumentParser(
        prog="deepgen_trainer.evaluation.evaluate_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="RL run folder, checkpoint-<step> folder, or converted .pth")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help="benchmark sets, e.g. en,zh,en_long,zh_long")
    parser.add_argument("--baseline", help="an earlier evaluation folder, or a checkpoint to evaluate as the baseline")
    parser.add_argument("--output_dir", help="default: <run>/eval/checkpoint-<step>, or <file stem>-eval")
    parser.add_argument(
        "--unigenbench_api_url", default=env.get("unigenbench_api_url"), help="[env UNIGENBENCH_API_URL]"
    )
    parser.add_argument(
        "--report_to", default="none", help="trackers for the metrics and contact sheets: wandb,swanlab"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images per generation pass")
    parser.add_argument(
        "--judge_batch", type=int, default=64, help="images per judging run (what an interruption can lose)"
    )
    parser.add_argument("--model", choices=MODEL_KINDS, help="for a .pth: hf (default) or tiny")
    parser.add_argument("--seed", type=int, help="for a .pth of the tiny model: its seed")
    for flag, kind in (
        ("image_height", int),
        ("image_width", int),
        ("num_inference_steps", int),
        ("eval_cfg_scale", float),
    ):
        parser.add_argument(f"--{flag}", type=kind, help="default: the run's, else the trainer's default")
    for flag in ("sd3_5_model_name_or_path", "qwen2_5_vl_model_name_or_path"):
        parser.add_argument(f"--{flag}", default=env.get(flag), help=f"[env {flag.upper()}]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    overrides = {
        k: v
        for k in (*GENERATION_FIELDS, "sd3_5_model_name_or_path", "qwen2_5_vl_model_name_or_path")
        if (v := getattr(args, k, None)) is not None
    }
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    try:
        if not args.unigenbench_api_url:
            raise ConfigError(
                "no eval service: set UNIGENBENCH_API_URL (or --unigenbench_api_url), e.g. grpc://127.0.0.1:50053"
            )
        if not sets:
            raise ConfigError(f"--sets {args.sets!r} names no set; e.g. --sets en,zh,en_long,zh_long")
        if args.batch_size < 1 or args.judge_batch < 1:
            raise ConfigError(
                f"--batch_size and --judge_batch must be >= 1, got {args.batch_size} and {args.judge_batch}"
            )
        options = Options(sets, args.unigenbench_api_url, args.batch_size, args.judge_batch)
        source = find_source(args.checkpoint, overrides)
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(source)
        summaries = evaluate_checkpoint(source, output_dir, options)
        baselines = baseline_summaries(args.baseline, sets, options, overrides) if args.baseline else {}
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (TransientError, RewardServiceError) as exc:  # the service failed; what was judged is kept
        log.error("the eval service failed: %s; run the same command again to resume", exc)
        return 1
    for set_name, summary in summaries.items():
        table = format_table(set_name, summary, baselines.get(set_name))
        (output_dir / set_name / TABLE_FILE).write_text(table, encoding="utf-8")
        sys.stdout.write(table + "\n")
    report(args.report_to, output_dir, source, summaries)
    log.info("evaluation written to %s", output_dir)
    return 0


def report(report_to: str, output_dir: Path, source: Source, summaries: dict[str, RunSummary]) -> None:
    """Log the `eval/<set>/...` metrics and the contact sheets at the checkpoint's step to the trackers
    (`--report_to wandb,swanlab`; offline runs under `output_dir`, named after the checkpoint)."""
    backends = [b.strip() for b in report_to.split(",") if b.strip() and b.strip() != "none"]
    if not backends:
        return
    name = f"eval-{source.path.parent.name}-{source.path.name}" if source.kind == "rl" else f"eval-{source.path.stem}"
    with Tracker(backends, output_dir=output_dir, run_name=name, config={"checkpoint": str(source.path)}) as tracker:
        metrics = {k: v for set_name, s in summaries.items() for k, v in summary_metrics(s, set_name).items()}
        tracker.log(metrics, step=source.step)
        sheets = {f"eval/{s}/contact_sheet": output_dir / s / CONTACT_SHEET_FILE for s in summaries}
        tracker.log_images(sheets, step=source.step)


if __name__ == "__main__":
    sys.exit(main())
