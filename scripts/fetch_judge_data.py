"""Download the judges' prompt templates and the UniGenBench benchmark from the model owners' public
GitHub repositories, at pinned commits, into a data folder (`make fetch-judge-data`):

    DEST/templates/    unifiedreward_think_image_pairwise.txt, unifiedreward_image_pointwise.txt,
                       unigenbench_{en,zh}.txt, unigenbench_explanations_{en,zh}.json,
                       unigenbench_lang_keys.json
    DEST/unigenbench/  test_prompts_{en,en_long,zh,zh_long}.csv

DEST defaults to ./data/judges, the folder docker-compose.yml mounts (JUDGE_DATA_DIR). The CSVs are
copied as they are. The templates live inside the upstream inference and evaluation scripts: they
are read from the scripts' syntax tree (`ast`), never by running them; an f-string becomes the
template text with `{name}` where the script interpolates `name`, and a dict literal becomes JSON.

Each produced file whose content is known is checked against a pinned sha256; the others (the CSVs,
which were not available to pin) are logged with their sha256 so that they can be pinned. Everything is
downloaded, extracted and checked before the first file is written, and each file is written to a
temporary name and renamed: a failure (HTTP error, changed content) leaves no partial file behind.

Standard library only, so it runs with any Python >= 3.11:
    python3 scripts/fetch_judge_data.py [--dest DIR] [--base-url URL]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fetch_judge_data")

RAW_GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Source:
    """One upstream file at a pinned commit."""

    repo: str
    commit: str
    path: str

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


UNIGENBENCH = "CodeGoat24/UniGenBench"
UNIFIEDREWARD = "CodeGoat24/UnifiedReward"

# The official UniGenBench evaluation scripts (template in an f-string, testpoint definitions in a dict,
# headers and column names in assignments) and the UnifiedReward inference examples.
UNIGENBENCH_EVAL = {
    "en": Source(UNIGENBENCH, "17947366b8c644316f1eb8465d1858eb52835205", "eval/qwenvl_72b_en_eval.py"),
    "zh": Source(UNIGENBENCH, "c4d815a2dfa8b3a7215a3b89c81ecc66439529a5", "eval/qwenvl_72b_zh_eval.py"),
}
THINK_PAIRWISE = Source(
    UNIFIEDREWARD,
    "dae5c7227e54279e7a40b00367635f35c03c8a15",
    "UnifiedReward-Think/inference_qwen/UnifiedReward-Think-qwen3vl-inference/qwen3vl_infer_cot_image_generation.py",
)
POINTWISE = Source(
    UNIFIEDREWARD,
    "a759534f868282616fae99f5a8d85ec3f294be0d",
    "inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py",
)
BENCHMARK_CSVS = {
    "test_prompts_en": Source(UNIGENBENCH, "202e3714d4f548846ef9b487df4f601df38439db", "data/test_prompts_en.csv"),
    "test_prompts_en_long": Source(
        UNIGENBENCH, "202e3714d4f548846ef9b487df4f601df38439db", "data/test_prompts_en_long.csv"
    ),
    "test_prompts_zh": Source(UNIGENBENCH, "e76f4e3c4a2db3b08c0a5b171d6dd54cc54351b4", "data/test_prompts_zh.csv"),
    "test_prompts_zh_long": Source(
        UNIGENBENCH, "90e271a03d23cd5fa50db889e2a41d210126a1c2", "data/test_prompts_zh_long.csv"
    ),
}


class FetchError(RuntimeError):
    """A download failed or produced other content than pinned; the message says which and why."""


# --- reading strings out of a Python script without running it ---------------------------------------


def _assigned_values(tree: ast.AST, name: str) -> list[ast.expr]:
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    ]


def _first_assigned(tree: ast.AST, name: str, kinds: tuple[type, ...], where: str) -> ast.expr:
    for value in _assigned_values(tree, name):
        if isinstance(value, kinds):
            return value
    wanted = " or ".join(k.__name__ for k in kinds)
    raise FetchError(f"{where}: no assignment `{name} = <{wanted}>` (has the upstream script changed?)")


def template_text(source: bytes, name: str, where: str) -> str:
    """The string assigned to `name`: a plain string, or an f-string whose `{expr}` fields become
    `{expr}` placeholders again (only bare names, as in the upstream templates)."""
    value = _first_assigned(ast.parse(source), name, (ast.Constant, ast.JoinedStr), where)
    if isinstance(value, ast.Constant):
        if not isinstance(value.value, str):
            raise FetchError(f"{where}: `{name}` is not a string")
        return value.value
    parts = []
    for part in value.values:
        if isinstance(part, ast.Constant):
            parts.append(part.value)
        elif (
            isinstance(part, ast.FormattedValue)
            and isinstance(part.value, ast.Name)
            and part.conversion == -1
            and part.format_spec is None
        ):
            parts.append("{" + part.value.id + "}")
        else:
            raise FetchError(f"{where}: `{name}` interpolates {ast.unparse(part)}; expected only {{name}} fields")
    return "".join(parts)


def dict_literal(source: bytes, name: str, where: str) -> dict:
    value = _first_assigned(ast.parse(source), name, (ast.Dict,), where)
    return ast.literal_eval(value)


def subscript_key(source: bytes, name: str, where: str) -> str:
    """`k` from `name = <anything>['k']` (e.g. the CSV column in `prompt = df.iloc[i]['prompt_en']`)."""
    value = _first_assigned(ast.parse(source), name, (ast.Subscript,), where)
    key = value.slice
    if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
        raise FetchError(f"{where}: `{name}` is not indexed by a string")
    return key.value


def header(source: bytes, name: str, where: str) -> str:
    """The block title of `name = "Checkpoints Defination:「"`: without the opening bracket(s) and colon
    (the zh script writes a full-width colon, and once a doubled bracket)."""
    return template_text(source, name, where).rstrip("「").rstrip(":：")


def as_json(obj: object) -> bytes:
    # The layout of the files in ../shared/data (one-space indent, UTF-8, no trailing newline).
    return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")


# --- what is produced from what -----------------------------------------------------------------------

Extract = Callable[[Mapping[Source, bytes]], bytes]


@dataclass(frozen=True)
class Output:
    """A file under DEST, made from `sources` by `extract`; `sha256` None: not pinned (logged)."""

    name: str
    sources: tuple[Source, ...]
    extract: Extract
    sha256: str | None


def _template(source: Source, name: str) -> Extract:
    return lambda files: template_text(files[source], name, source.path).encode("utf-8")


def _explanations(source: Source) -> Extract:
    return lambda files: as_json(dict_literal(files[source], "explanation_dict", source.path))


def _lang_keys(files: Mapping[Source, bytes]) -> bytes:
    keys = {}
    for language, source in UNIGENBENCH_EVAL.items():
        script, where = files[source], source.path
        keys[language] = {
            "prompt_column": subscript_key(script, "prompt", where),
            "subdim_column": subscript_key(script, "subdim_dicts", where),
            "testpoint_key": subscript_key(script, "test_point", where),
            "desc_key": subscript_key(script, "test_desc", where),
            "checkpoint_header": header(script, "explanation", where),
            "checkpoint_desc_header": header(script, "test_explanation", where),
        }
    return as_json(keys)


def _verbatim(source: Source) -> Extract:
    return lambda files: files[source]


# Pinned digests of the produced files. The four templates and the language keys are identical to
# ../shared/data/templates. The explanation dictionaries of these script versions differ from the
# shared copies in known ways: en writes "model’s" (U+2019) in "Grammar - Negation", zh has no
# "属性-颜色" / "属性-形状" entries (eval-unigenbench then falls back to the primary dimension's
# definition or says "(no definition)").
OUTPUTS = (
    Output(
        "templates/unifiedreward_think_image_pairwise.txt",
        (THINK_PAIRWISE,),
        _template(THINK_PAIRWISE, "problem"),
        "a8a0d80818246406b783d5cca630336c5fdf1264fef13f09d09bd94d61a139d5",
    ),
    Output(
        "templates/unifiedreward_image_pointwise.txt",
        (POINTWISE,),
        _template(POINTWISE, "problem"),
        "75d52d3ae771f89b682db3b74cdaca1c7bde373a39162bc1c9dabd63cdc9b851",
    ),
    Output(
        "templates/unigenbench_en.txt",
        (UNIGENBENCH_EVAL["en"],),
        _template(UNIGENBENCH_EVAL["en"], "system_prompt"),
        "9554ee938feaaf928d9086ba959e19063bcb027be086821d7dcb45e55ad40f14",
    ),
    Output(
        "templates/unigenbench_zh.txt",
        (UNIGENBENCH_EVAL["zh"],),
        _template(UNIGENBENCH_EVAL["zh"], "system_prompt"),
        "03ccae681043f88291c14036b98ee99fbe34ac7659fe2186244afec075698926",
    ),
    Output(
        "templates/unigenbench_explanations_en.json",
        (UNIGENBENCH_EVAL["en"],),
        _explanations(UNIGENBENCH_EVAL["en"]),
        "c51dffd3b0e2c3227e982a9c696c06921e67f71ff4e80dc54a74d59738b82be4",
    ),
    Output(
        "templates/unigenbench_explanations_zh.json",
        (UNIGENBENCH_EVAL["zh"],),
        _explanations(UNIGENBENCH_EVAL["zh"]),
        "1cf87b24ad187965b6990a8b8363ec03e9be3c2210e710020c574a1774b06eab",
    ),
    Output(
        "templates/unigenbench_lang_keys.json",
        tuple(UNIGENBENCH_EVAL.values()),
        _lang_keys,
        "235dcbcdbce21d9f65308298dd9a7ccd0f2e0eeb916e6f4c44cc09085cd35998",
    ),
    *(Output(f"unigenbench/{stem}.csv", (s,), _verbatim(s), None) for stem, s in BENCHMARK_CSVS.items()),
)


# --- download, check, write ---------------------------------------------------------------------------


def download(url: str, timeout_s: float) -> bytes:
    if not url.startswith(("https://", "http://")):
        raise FetchError(f"{url}: --base-url must be an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
            return response.read()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"GET {url}: HTTP {exc.code} {exc.reason} (is the pinned commit/path still there?)") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"GET {url}: {getattr(exc, 'reason', exc)} (no network? set --base-url to a mirror)") from exc


def build(outputs: tuple[Output, ...], base_url: str, timeout_s: float) -> dict[str, bytes]:
    """name -> content of every output, downloaded, extracted and checked; raises FetchError."""
    files: dict[Source, bytes] = {}
    for source in dict.fromkeys(s for o in outputs for s in o.sources):
        url = source.url(base_url)
        log.info("GET %s", url)
        files[source] = download(url, timeout_s)
    contents = {}
    for output in outputs:
        try:
            data = output.extract(files)
        except SyntaxError as exc:
            raise FetchError(f"{output.name}: upstream script does not parse: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if output.sha256 is None:
            _check_csv(output.name, data)
            log.info("%s: sha256 %s (not pinned)", output.name, digest)
        elif digest != output.sha256:
            raise FetchError(
                f"{output.name}: sha256 {digest}, pinned {output.sha256}: the upstream content differs from what "
                "was pinned (or something between altered it); nothing was written"
            )
        contents[output.name] = data
    return contents


def _check_csv(name: str, data: bytes) -> None:
    first_line = data.decode("utf-8-sig", errors="replace").partition("\n")[0]
    columns = [c.strip() for c in first_line.split(",")]
    if "index" not in columns or not any(c.startswith("prompt") for c in columns):
        raise FetchError(f"{name}: not a benchmark CSV (first line {first_line[:80]!r}); nothing was written")


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the files are read by the (non-root) services
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(dest: Path, base_url: str = RAW_GITHUB, timeout_s: float = 60.0) -> list[Path]:
    """Fetch every output into `dest`; returns the written paths. Raises FetchError before writing
    anything when a download or a check fails."""
    contents = build(OUTPUTS, base_url, timeout_s)
    written = []
    for name, data in contents.items():
        write_atomically(dest / name, data)
        written.append(dest / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("data/judges"), help="data folder (default: data/judges)")
    parser.add_argument(
        "--base-url",
        default=RAW_GITHUB,
        help=f"serves <repo>/<commit>/<path> like {RAW_GITHUB} (default); e.g. a mirror",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per download (default: 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fetch-judge-data: %(message)s")
    try:
        written = fetch(args.dest, args.base_url, args.timeout)
    except FetchError as exc:
        log.error("%s", exc)
        return 1
    log.info("wrote %d files under %s", len(written), args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
