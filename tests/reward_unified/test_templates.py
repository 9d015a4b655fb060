"""Judge templates are data, loaded from TEMPLATES_DIR (the project's fixtures in the upstream format; the real
ones for parity when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reward_unified.settings import UnifiedSettings
from reward_unified.templates import PAIRWISE_FILE, Templates, fill
from tests.helpers import JUDGE_FIXTURES

TEMPLATES = JUDGE_FIXTURES / "templates"


@pytest.mark.parametrize("source", ["fixtures", "upstream"])
def test_loads_the_templates(request: pytest.FixtureRequest, source: str):
    directory = TEMPLATES if source == "fixtures" else request.getfixturevalue("upstream_data") / "templates"
    templates = Templates.load(directory)
    text = fill(templates.pairwise, "two pandas in spacesuits")
    assert "「two pandas in spacesuits」" in text
    assert "<answer>Image 1 is better</answer>" in text  # the format example survives filling
    assert "Text Caption: [a red bus]" in fill(templates.pointwise, "a red bus")


def test_missing_template_says_how_to_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"{PAIRWISE_FILE} .* set TEMPLATES_DIR"):
        Templates.load(tmp_path)


def test_template_without_placeholder_is_rejected(tmp_path: Path):
    for name in ("unifiedreward_think_image_pairwise.txt", "unifiedreward_image_pointwise.txt"):
        (tmp_path / name).write_text((TEMPLATES / name).read_text())
    (tmp_path / PAIRWISE_FILE).write_text("Which image is better?")
    with pytest.raises(ValueError, match=r"must contain the placeholder \{prompt\} exactly once"):
        Templates.load(tmp_path)


def test_settings_read_the_seed_variables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("UNIFIEDREWARD_THINK_WORKERS", "7")
    monkeypatch.setenv("JUDGE_URL", "http://judge:9000/v1")
    monkeypatch.setenv("JUDGE_EXTRA_BODY", '{"structured_outputs": {"regex": "x"}}')
    s = UnifiedSettings()
    assert (s.workers, s.judge_url, s.judge_model, s.http_port) == (7, "http://judge:9000/v1", "UnifiedReward", 18087)
    assert s.judge_client().extra_body == {"structured_outputs": {"regex": "x"}}


def test_settings_reject_an_extra_body_that_is_not_a_json_object(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JUDGE_EXTRA_BODY", "[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        UnifiedSettings()
