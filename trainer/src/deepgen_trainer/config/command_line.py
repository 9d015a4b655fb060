"""The command line: one ``--flag`` per `TrainConfig` field (booleans also get ``--no-flag``), the
original DeepGen-RL's flags translated, defaults from the environment, and a --help naming every default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import textwrap
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deepgen_trainer.config.choices import tracker_names
from deepgen_trainer.config.environment import (
    ALGORITHM_ENV_FIELDS,
    ENV_FIELDS,
    URL_FIELDS,
    algorithm_env,
    deployment_env,
)
from deepgen_trainer.config.errors import ConfigError
from deepgen_trainer.config.train_config import TrainConfig
from deepgen_trainer.original import flags as original_flags
from deepgen_trainer.original import urls as original_urls

log = logging.getLogger("deepgen_trainer")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Raise instead of exiting so that callers (and tests) see one exception type for bad flags.
        raise ConfigError(f"{message}; see --help for the valid flags")


def shown_default(value: Any) -> str:
    """A default as it would be typed on the command line: lists comma-separated (``none`` when empty),
    None as ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Names every option's default in --help, also for options without a help text and options added
    later, unless the help already names it (``(default: all)``, argparse's ``%(default)s``)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not (action.help or "").strip():
            action = copy.copy(action)  # argparse prints no help line for an empty help
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        names_it = "(default" in help_text or "%(default)" in help_text
        if not action.option_strings or action.default is argparse.SUPPRESS or names_it:
            return help_text
        shown = shown_default(action.default).replace("%", "%%")  # the help is %-formatted afterwards
        return f"{help_text} (default: {shown})".strip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        # As argparse's, but never breaking a hyphenated value (deepgen-rl) across lines.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _RecordGiven(argparse.Action):
    """Stores the value and remembers that the flag was on the command line (to log its source)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.__dict__.setdefault("_given", set()).add(self.dest)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """One ``--flag`` per `TrainConfig` field; env-backed flags default to their environment variable."""
    parser = _Parser(
        prog="deepgen_trainer", description="MR-GRPO training of DeepGen 1.0.", formatter_class=DefaultsHelpFormatter
    )
    env = deployment_env(environ) | algorithm_env(environ)
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = env.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if f.name in ENV_FIELDS.values():
            help_text += f" [env {f.name.upper()}]"
        if f.name == "save_total_limit":
            parser.add_argument(f"--{f.name}", type=_keep_limit, default=default, help=help_text)  # -1 or 0: all
            continue
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "report_to":
            parser.add_argument(f"--{f.name}", type=tracker_names, default=default, help=help_text)
        elif f.name == "reward_funcs":  # the original's nargs="+"; commas also separate
            parser.add_argument(f"--{f.name}", nargs="+", default=default, help=help_text)
        elif f.name in ALGORITHM_ENV_FIELDS.values():
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text, action=_RecordGiven)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
    original_flags.add_original_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Flags > environment (deployment facts and ATRAIN_* knobs) > defaults, validated. Raises `ConfigError`.
    The original DeepGen-RL's flags are translated (`deepgen_trainer.original.flags`), each with one
    INFO line."""
    namespace = build_parser(environ).parse_args(argv)
    if namespace.reward_funcs is not None:
        namespace.reward_funcs = tuple(
            n.strip() for part in namespace.reward_funcs for n in part.split(",") if n.strip()
        )
    given_algorithm = namespace.__dict__.pop("_given", set())
    given = original_flags.pop_original_flags(namespace)
    values = vars(namespace)
    values |= {name: original_urls.with_scheme(values[name]) for name in URL_FIELDS if values[name]}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    try:
        overrides, notices = original_flags.translate(given, values, defaults)
    except original_flags.OriginalFlagError as exc:
        raise ConfigError(str(exc)) from None
    values["report_to"], report_notices = original_flags.translate_report_to(values["report_to"])
    if (os.environ if environ is None else environ).get("RANK", "0") == "0":  # one line per run, not per rank
        for notice in [*notices, *report_notices]:
            logging.getLogger(__package__).info("%s", notice)  # the package's logger: deepgen_trainer.config
    cfg = TrainConfig(**{**values, **overrides})
    _log_algorithm_sources(cfg, given_algorithm, os.environ if environ is None else environ)
    return cfg


def _keep_limit(value: str) -> int | None:
    """``--save_total_limit``: -1 (the original's default) or 0 keeps every checkpoint, as in HF's Trainer."""
    limit = int(value)
    return None if limit <= 0 else limit


def _log_algorithm_sources(cfg: TrainConfig, given: set[str], environ: Mapping[str, str]) -> None:
    """One line: each algorithm knob's value and where it came from (command line, environment, default)."""
    parts = []
    for var, name in ALGORITHM_ENV_FIELDS.items():
        if name in given:
            source = "command line" + (f", over {var}={environ[var]}" if environ.get(var) else "")
        elif environ.get(var):
            source = f"env {var}"
        else:
            source = "default"
        parts.append(f"--{name} {getattr(cfg, name)} ({source})")
    log.info("algorithm %s: %s", cfg.atrain_algorithm, ", ".join(parts))
    if cfg.atrain_nft_off_policy and cfg.atrain_algorithm != "diffusionnft":
        log.info("--atrain_nft_off_policy has no effect with --atrain_algorithm %s (it is DiffusionNFT's)",
                 cfg.atrain_algorithm)  # fmt: skip


def _scalar_type(hint: Any) -> type:
    """str/int/float/bool of a field's annotation (``int | None`` → int, ``Literal[...]`` → str)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        origin = get_origin(hint)
    if origin is Literal:
        return str
    return hint
