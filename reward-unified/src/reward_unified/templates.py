"""The judge's prompt templates: data files loaded from `TEMPLATES_DIR` at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAIRWISE_FILE = "unifiedreward_think_image_pairwise.txt"
POINTWISE_FILE = "unifiedreward_image_pointwise.txt"


@dataclass(frozen=True)
class Templates:
    pairwise: str
    pointwise: str

    @classmethod
    def load(cls, directory: Path) -> Templates:
        """Raises FileNotFoundError / ValueError naming the file and the fix."""
        return cls(pairwise=_read(directory, PAIRWISE_FILE), pointwise=_read(directory, POINTWISE_FILE))


def _read(directory: Path, name: str) -> str:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(
            f"judge template {path} not found: set TEMPLATES_DIR to the folder holding {name} "
            "(`make fetch-judge-data` downloads the official templates)"
        )
    text = path.read_text(encoding="utf-8")
    if text.count("{prompt}") != 1:
        raise ValueError(f"judge template {path} must contain the placeholder {{prompt}} exactly once")
    return text


def fill(template: str, prompt: str) -> str:
    """Insert the prompt; plain replacement, since templates contain other braces."""
    return template.replace("{prompt}", prompt)
