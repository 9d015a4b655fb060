"""scripts/fetch_judge_data.py against a local stand-in for raw.githubusercontent.com.

GitHub cannot be reached here, so a real HTTP server on 127.0.0.1 serves a fake upstream tree laid out as
<repo>/<commit>/<path>, built from the upstream judge files (JUDGE_DATA_DIR or ../shared/data; these are
parity tests, skipped without them): the benchmark CSVs as they are, and Python scripts that embed the
templates the way the upstream scripts do (an f-string inside a function, a dict literal, header strings,
CSV column subscripts). The script must extract them without running them and check them against its
pinned digests.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest

from eval_unigenbench.benchmark import load_benchmark
from eval_unigenbench.judge_prompt import Templates
from tests.helpers import REPO


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_judge_data", REPO / "scripts" / "fetch_judge_data.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fetch_judge_data = _load_script()


def upstream_explanations(templates: Path, language: str) -> dict[str, str]:
    """The testpoint definitions as the pinned upstream scripts write them (see OUTPUTS in the script):
    the shared copy with a typographic apostrophe (en), or without the colour and shape entries (zh)."""
    explanations = json.loads((templates / f"unigenbench_explanations_{language}.json").read_text(encoding="utf-8"))
    if language == "en":
        negation = "Grammar - Negation"
        explanations[negation] = explanations[negation].replace("model's", "model\u2019s")
    else:
        del explanations["属性-颜色"], explanations["属性-形状"]
    return explanations


def eval_script(templates: Path, language: str) -> str:
    """A stand-in for eval/qwenvl_72b_{language}_eval.py with the same assignments."""
    template = (templates / f"unigenbench_{language}.txt").read_text(encoding="utf-8")
    keys = json.loads((templates / "unigenbench_lang_keys.json").read_text(encoding="utf-8"))[language]
    colon = ":" if language == "en" else "："
    return f"""
import json

def call_evaluation(args):
    index, prompt, testpoint, test_desc, img_path = args
    explanation_dict = {upstream_explanations(templates, language)!r}
    explanation = {keys["checkpoint_header"] + colon + "「"!r}
    test_explanation = {keys["checkpoint_desc_header"] + colon + "「"!r}
    while True:
        system_prompt = f{template!r}
        return system_prompt

def main(df):
    for i in range(len(df)):
        prompt = df.iloc[i][{keys["prompt_column"]!r}]
        subdim_dicts = df.iloc[i][{keys["subdim_column"]!r}]
        test_point = json.loads(subdim_dicts)[{keys["testpoint_key"]!r}]
        test_desc = json.loads(subdim_dicts)[{keys["desc_key"]!r}]
"""


def inference_script(template: str) -> str:
    """A stand-in for a UnifiedReward inference example: `problem` is an f-string over `prompt`."""
    return f"prompt = ''\nproblem = f{template!r}\nprint(problem)\n"


def build_upstream(root: Path, data: Path) -> None:
    """Lay out every Source of the script under root/<repo>/<commit>/<path>, from the upstream files in data."""
    templates = data / "templates"

    def put(source: object, text: str | bytes) -> None:
        path = root / source.repo / source.commit / source.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))

    for language, source in fetch_judge_data.UNIGENBENCH_EVAL.items():
        put(source, eval_script(templates, language))
    put(
        fetch_judge_data.THINK_PAIRWISE,
        inference_script((templates / "unifiedreward_think_image_pairwise.txt").read_text(encoding="utf-8")),
    )
    put(
        fetch_judge_data.POINTWISE,
        inference_script((templates / "unifiedreward_image_pointwise.txt").read_text(encoding="utf-8")),
    )
    for stem, source in fetch_judge_data.BENCHMARK_CSVS.items():
        put(source, (data / "unigenbench" / f"{stem}.csv").read_bytes())


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream(tmp_path: Path, upstream_data: Path) -> Iterator[tuple[Path, str]]:
    """(tree root, base URL) of a real HTTP server on a free port serving the fake upstream tree."""
    root = tmp_path / "upstream"
    build_upstream(root, upstream_data)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_writes_the_expected_files(upstream: tuple[Path, str], upstream_data: Path, tmp_path: Path) -> None:
    _, base_url = upstream
    templates, benchmark = upstream_data / "templates", upstream_data / "unigenbench"
    dest = tmp_path / "judges"
    assert fetch_judge_data.main(["--dest", str(dest), "--base-url", base_url]) == 0

    written = files_under(dest)
    expected_templates = {p.name for p in templates.iterdir()}
    assert set(written) == {f"templates/{n}" for n in expected_templates} | {
        f"unigenbench/{p.name}" for p in benchmark.iterdir()
    }
    for name in expected_templates - {"unigenbench_explanations_en.json", "unigenbench_explanations_zh.json"}:
        assert written[f"templates/{name}"] == (templates / name).read_bytes(), name
    for language in ("en", "zh"):
        produced = json.loads(written[f"templates/unigenbench_explanations_{language}.json"])
        assert produced == upstream_explanations(templates, language)
    for csv in benchmark.iterdir():
        assert written[f"unigenbench/{csv.name}"] == csv.read_bytes()
    assert all((dest / name).stat().st_mode & 0o444 == 0o444 for name in written)  # readable by the services

    # What the eval service loads at start: the template with its placeholders, the benchmark.
    for language in ("en", "zh"):
        templates = Templates.load(dest / "templates", language)
        assert "{test_explanation}" in templates.template
        assert templates.checkpoint_header in ("Checkpoints Defination", "考点说明")
    assert len(load_benchmark(dest / "unigenbench" / "test_prompts_en.csv").items) > 100


def test_checksum_mismatch_fails_and_writes_nothing(
    upstream: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, base_url = upstream
    source = fetch_judge_data.UNIGENBENCH_EVAL["en"]
    script = root / source.repo / source.commit / source.path
    script.write_text(script.read_text(encoding="utf-8").replace("precise and objective", "precise"), encoding="utf-8")
    dest = tmp_path / "judges"
    old = dest / "templates" / "unigenbench_en.txt"
    old.parent.mkdir(parents=True)
    old.write_text("the previous template")

    assert fetch_judge_data.main(["--dest", str(dest), "--base-url", base_url]) == 1

    assert "templates/unigenbench_en.txt: sha256" in caplog.text
    assert "pinned 9554ee93" in caplog.text
    assert files_under(dest) == {"templates/unigenbench_en.txt": b"the previous template"}  # untouched


def test_missing_upstream_file_fails_with_the_url(
    upstream: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, base_url = upstream
    source = fetch_judge_data.BENCHMARK_CSVS["test_prompts_zh_long"]
    shutil.rmtree(root / source.repo / source.commit)
    dest = tmp_path / "judges"

    assert fetch_judge_data.main(["--dest", str(dest), "--base-url", base_url]) == 1

    assert f"{base_url}/{source.repo}/{source.commit}/{source.path}: HTTP 404" in caplog.text
    assert not dest.exists()


def test_not_a_csv_fails(upstream: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The CSVs have no pinned digest yet: an HTML error page served with status 200 must still fail."""
    root, base_url = upstream
    source = fetch_judge_data.BENCHMARK_CSVS["test_prompts_en"]
    (root / source.repo / source.commit / source.path).write_text("<html>rate limited</html>")
    dest = tmp_path / "judges"

    assert fetch_judge_data.main(["--dest", str(dest), "--base-url", base_url]) == 1

    assert "unigenbench/test_prompts_en.csv: not a benchmark CSV" in caplog.text
    assert not dest.exists()


def test_template_with_an_unexpected_field_is_rejected() -> None:
    source = b"x = 1\nproblem = f'caption: {prompt!r}'\n"
    with pytest.raises(fetch_judge_data.FetchError, match=r"interpolates"):
        fetch_judge_data.template_text(source, "problem", "example.py")


def test_no_partial_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "templates" / "t.txt"
    target.parent.mkdir()
    target.write_text("old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fetch_judge_data.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fetch_judge_data.write_atomically(target, b"new")
    assert files_under(tmp_path) == {"templates/t.txt": b"old"}  # no temporary file left behind
