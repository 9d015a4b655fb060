"""Issue 20: a stranger's checkpoint is as safe to load as a safetensors file. One test per family of
attacks; each loads its files in a child process (`hostile_files` driver, address space capped) under
a wall-clock watchdog, through the trainer's entry points (``read``: ``--checkpoint``,
``--merge-onto``, ``make eval``; ``resume``: the trainer's own resume; the DeepSpeed engine's resume
and the convert CLI end to end). Code execution is detected by a marker file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deepgen_trainer.checkpoints.run_checkpoint import save_checkpoint
from tests.helpers import REPO
from tests.trainer.checkpoints import hostile_files as hf
from tests.trainer.test_train import SMALL

WATCHDOG_S = 90


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def drive(tmp_path: Path, specs: list[tuple[str, Path]], cwd: Path | None = None) -> list[dict]:
    """Load each (entry, path) in one child process; the watchdog fails the test if it hangs."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps([{"entry": e, "path": str(p)} for e, p in specs]))
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.trainer.checkpoints.hostile_files", str(spec_file)],
            cwd=cwd or tmp_path, env=child_env(), capture_output=True, text=True, timeout=WATCHDOG_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"loading hung for {WATCHDOG_S} s (killed): {(e.stdout or b'')[-2000:]!r}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs), done.stdout[-3000:] + done.stderr[-3000:]
    print(f"{len(specs)} files in {time.monotonic() - start:.1f} s")
    return results


def assert_refused(results: list[dict], reasons: dict[str, str]) -> None:
    """Every result refused, none out of memory or poisoned, each message naming its file and `reasons[name]`."""
    for r in results:
        name = Path(r["path"]).name
        assert r["outcome"] == "refused", r
        assert not r["poisoned"], r
        assert name in r["message"] or "latest" in r["message"] or "last_checkpoint" in r["message"], r
        assert reasons[name].lower() in r["message"].lower(), (reasons[name], r)


def own_checkpoint(out: Path, step: int = 1, **files: bytes) -> Path:
    """A complete checkpoint of this trainer (tiny weights), with `files` written over its own."""
    path = save_checkpoint(out, step, trainable={"w": torch.zeros(2)}, optimizer_state={"state": {}})
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


# --- 1. code execution -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_code_in_a_deepspeed_resume_does_not_run(tmp_path: Path) -> None:
    """The trainer resumes with DeepSpeed from a folder whose engine state file runs code: refused, exit 2,
    one line naming the file, no training step."""
    from deepgen_trainer.model.tiny import build_tiny
    from tests.trainer.checkpoints.test_ema import write_prompts

    marker, out = tmp_path / "pwned", tmp_path / "run"

    def engine_save(directory: Path) -> None:
        (directory / "state").mkdir(parents=True)
        torch.save({"module": {}, "evil": RunsCode(marker)}, directory / "state" / "mp_rank_00_model_states.pt")

    save_checkpoint(out, 1, trainable=build_tiny(seed=0).transformer.state_dict(), deepspeed_save=engine_save)
    argv = [*SMALL, "--deepspeed", "zero2", "--dataset_config", str(write_prompts(tmp_path)), "--output_dir",
            str(out), "--max_steps", "2"]  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, "-m", "deepgen_trainer.train", *argv], cwd=tmp_path, env=child_env(),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the resume hung")
    assert not marker.exists(), "the engine state file ran code"
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "mp_rank_00_model_states.pt" in errors[0], errors
    assert "posix.system" in errors[0], errors
    assert not (out / "checkpoint-2").exists()
    assert not (out / "metrics.jsonl").exists()


def test_code_in_any_file_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": RunsCode(marker)}, tmp_path / "sft.pth")
    evil = (tmp_path / "sft.pth").read_bytes()
    ckpt = own_checkpoint(tmp_path / "run", **{"optimizer.pt": evil})
    results = drive(tmp_path, [("read", tmp_path / "sft.pth"), ("resume", ckpt)])
    assert not marker.exists()
    assert_refused(results[:1], {"sft.pth": "posix.system"})
    assert results[1]["outcome"] == "refused", results[1]
    assert "optimizer.pt" in results[1]["message"], results[1]


# --- 2. state poisoning ----------------------------------------------------------------------------------


def poisoning_pickle() -> bytes:
    """BUILD on torch's own _rebuild_tensor_v2: sets its __defaults__ (the slot state of BUILD)."""
    defaults = hf.MARK + hf.NONE + hf.NONE + hf.NONE + hf.TUPLE
    state = hf.MARK + hf.NONE + hf.EMPTY_DICT + hf.op_str("__defaults__") + defaults + hf.SETITEM + hf.TUPLE
    return hf.state_dict(("w", hf.op_global("torch._utils", "_rebuild_tensor_v2") + state + hf.BUILD))


def test_a_file_cannot_change_what_later_loads_return(tmp_path: Path) -> None:
    poison = hf.torch_zip(tmp_path / "poison.pth", poisoning_pickle())
    ckpt = own_checkpoint(tmp_path / "run", **{"optimizer.pt": poison.read_bytes()})
    results = drive(tmp_path, [("read", poison), ("resume", ckpt)])
    assert_refused(results[:1], {"poison.pth": "BUILD"})
    assert results[1]["outcome"] == "refused", results[1]
    assert not results[1]["poisoned"], results[1]


# --- 3. file writes: the legacy and tar formats ----------------------------------------------------------


def test_legacy_and_tar_formats_are_refused_without_reading_them(tmp_path: Path) -> None:
    # A persistent id naming a source module: torch's legacy reader compares sources and may write a .patch.
    module_pid = hf.MARK + hf.op_str("module") + hf.op_global("torch.nn", "Linear") + hf.op_str("../../x.py")
    module_pid += hf.op_str("class Linear: pass\n") + hf.TUPLE + hf.BINPERSID
    legacy = hf.legacy_file(tmp_path / "legacy.pth", hf.state_dict(("m", module_pid)))
    fifo = hf.tar_with_fifo(tmp_path / "fifo.tar.pth")
    results = drive(tmp_path, [("read", legacy), ("read", fifo)])
    assert_refused(results, {"legacy.pth": "legacy", "fifo.tar.pth": "tar"})
    assert not list(tmp_path.parent.rglob("*.patch"))
    assert not list(Path.cwd().glob("*.patch"))


# --- 4. memory disclosure --------------------------------------------------------------------------------


def test_no_tensor_is_built_from_memory_the_file_did_not_fill(tmp_path: Path) -> None:
    uninit = hf.torch_zip(tmp_path / "uninit.pth", hf.state_dict(("w", hf.call("torch", "Tensor", hf.op_int(4096)))))
    legacy_cls = hf.torch_zip(
        tmp_path / "floattensor.pth", hf.state_dict(("w", hf.call("torch", "FloatTensor", hf.op_int(4096))))
    )
    # The storage declares 4096 floats, its record holds 16 bytes.
    short = hf.torch_zip(
        tmp_path / "short.pth", hf.state_dict(("w", hf.tensor_ops("0", 4096, (4096,), (1,)))), {"0": bytes(16)}
    )
    # A view reading past the end of its (honest) storage.
    past = hf.torch_zip(
        tmp_path / "past.pth", hf.state_dict(("w", hf.tensor_ops("0", 4, (4096,), (1,)))), {"0": bytes(16)}
    )
    results = drive(tmp_path, [("read", uninit), ("read", legacy_cls), ("read", short), ("read", past)])
    assert_refused(
        results,
        {"uninit.pth": "torch.Tensor", "floattensor.pth": "FloatTensor", "short.pth": "holds 16 bytes",
         "past.pth": "reads past"},
    )  # fmt: skip


# --- 5. denial of service --------------------------------------------------------------------------------


def test_work_and_memory_are_bounded_by_the_file(tmp_path: Path) -> None:
    w = ("w", hf.tensor_ops("0", 1, (1,), (1,)))
    record = {"0": bytes(4)}
    cyclic = hf.torch_zip(tmp_path / "cyclic.pth", hf.state_dict(w, ("meta", hf.EMPTY_LIST + hf.put(0) + hf.get(0)
                                                                          + hf.APPEND)), record)  # fmt: skip
    dag = hf.EMPTY_LIST + hf.put(0)
    for level in range(1, 50):  # level i holds level i-1 twice: 2**49 paths without a visited set
        dag += hf.EMPTY_LIST + hf.MARK + hf.get(level - 1) + hf.get(level - 1) + b"e" + hf.put(level)
    shared = hf.torch_zip(tmp_path / "dag.pth", hf.state_dict(w, ("meta", dag)), record)
    files = {
        "bytearray.pth": hf.state_dict(("b", hf.call("builtins", "bytearray", hf.op_int(2**33)))),
        "range.pth": hf.state_dict(("s", hf.call("builtins", "set", hf.call("builtins", "range", hf.op_int(10**9))))),
        "encode.pth": hf.state_dict(
            (
                "x",
                hf.op_str("a" * 2**20)
                + hf.put(9)
                + hf.POP
                + hf.EMPTY_LIST
                + hf.MARK
                + hf.call("_codecs", "encode", hf.get(9), hf.op_str("latin1")) * 2000
                + b"e",
            )
        ),
        "classes.pth": hf.PROTO
        + b"".join(hf.op_global(f"m{i}", "C") + hf.POP for i in range(700_000))
        + hf.EMPTY_DICT
        + hf.STOP,
    }
    paths = [hf.torch_zip(tmp_path / name, data) for name, data in files.items()]
    stride0 = hf.torch_zip(tmp_path / "stride0.pth", hf.state_dict(("w", hf.tensor_ops("0", 1, (2**30,), (0,)))),
                           record)  # fmt: skip
    bomb = hf.deflate_bomb(tmp_path / "deflate.pth", 1536 * 2**20)
    assert bomb.stat().st_size < 8 * 2**20
    assert stride0.stat().st_size < 1024
    results = drive(tmp_path, [("read", p) for p in [cyclic, shared, *paths, stride0, bomb]])
    for r in results[:2]:  # harmless shapes: loaded, in bounded time
        assert r["outcome"] in ("loaded", "refused"), r
        assert "Memory" not in r["message"], r
    assert_refused(
        results[2:],
        {"bytearray.pth": "from a size", "range.pth": "builtins.range", "encode.pth": "budget",
         "classes.pth": "unknown classes", "stride0.pth": "stride-0", "deflate.pth": "compressed"},
    )  # fmt: skip


# --- 6. paths ---------------------------------------------------------------------------------------------


def deepspeed_tag(folder: Path) -> Path:
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, folder / "mp_rank_00_model_states.pt")
    return folder


def test_entries_pointing_outside_the_folder_are_refused(tmp_path: Path) -> None:
    outside_tag = deepspeed_tag(tmp_path / "elsewhere" / "global_step1")
    absolute = tmp_path / "absolute"
    absolute.mkdir()
    (absolute / "latest").write_text(str(outside_tag))
    dotdot = tmp_path / "dotdot"
    dotdot.mkdir()
    (dotdot / "latest").write_text("../elsewhere/global_step1")
    torch.save({"w": torch.ones(2)}, tmp_path / "outside.pth")
    (tmp_path / "cwd").mkdir()
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    (work_dir / "last_checkpoint").write_text("../outside.pth")  # relative: to the folder, never the cwd
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "secret.safetensors")
    (shards / "model.safetensors").symlink_to(tmp_path / "secret.safetensors")
    own = own_checkpoint(tmp_path / "run")
    (own / "transformer.safetensors").unlink()
    (own / "transformer.safetensors").symlink_to(tmp_path / "secret.safetensors")
    specs = [("read", absolute), ("read", dotdot), ("read", work_dir), ("read", shards), ("resume", own),
             ("read", own), ("eval", own)]  # fmt: skip
    results = drive(tmp_path, specs, cwd=tmp_path / "cwd")
    for r in results:
        assert r["outcome"] == "refused", r
        assert "points outside" in r["message"], r
    assert "latest" in results[0]["message"]
    assert "last_checkpoint" in results[2]["message"]
    assert "model.safetensors" in results[3]["message"]
    assert "transformer.safetensors" in results[4]["message"]
    assert results[5]["message"].startswith("UnsafeCheckpointError")  # --checkpoint / --merge-onto: exit 2
    assert results[6]["message"].startswith("ConfigError")  # make eval: exit 2


# --- 7. the JSON files -------------------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000  # past Python's recursion limit


def meta(**fields: object) -> bytes:
    return json.dumps({"format_version": 1, "step": 1, "world_size": 1, "metadata": {}, **fields}).encode()


def test_every_json_file_is_bounded_checked_and_refused_naming_it(tmp_path: Path) -> None:
    """meta.json, config.json, the per-rank sampler state and the original's trainer_state.json: a regular
    file inside the folder, at most MAX_JSON_BYTES, valid JSON of the types written, or a refusal naming the
    file (never a traceback, a recursion crash or a hang on a FIFO)."""
    cases = {  # name: (file, bytes or None for a FIFO or a sparse 65 MiB file, reason)
        "truncated": ("meta.json", b'{"format_version": 1, "step"', "not valid JSON"),
        "deep": ("meta.json", DEEP, "nested too deeply"),
        "step": ("meta.json", meta(step="1"), "'step' must be an integer >= 0"),
        "world": ("meta.json", meta(world_size=0), "'world_size' must be an integer >= 1"),
        "metadata": ("meta.json", meta(metadata=[1]), "'metadata' must be a JSON object"),
        "fifo": ("meta.json", None, "not a regular file"),
        "config": ("config.json", b"[]", "not a JSON object"),
        "sampler": ("sampler_rank0.json", DEEP, "nested too deeply"),
        "huge": ("config.json", b"", "over the 67108864"),
    }
    specs = []
    for name, (file, data, _) in cases.items():
        ckpt = own_checkpoint(tmp_path / name)
        (ckpt / file).unlink(missing_ok=True)
        if data is None:
            os.mkfifo(ckpt / file)
        else:
            (ckpt / file).write_bytes(data)
        if name == "huge":
            with (ckpt / file).open("r+b") as f:
                f.truncate(65 << 20)  # sparse: the size is checked before a byte is read
        specs.append(("resume", ckpt))
    original = tmp_path / "original"
    (original / "checkpoint-3").mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, original / "checkpoint-3" / "model.safetensors")
    (original / "checkpoint-3" / "trainer_state.json").write_bytes(DEEP)
    specs.append(("scan", original))
    wrong_type = own_checkpoint(tmp_path / "eval-types")
    (wrong_type / "config.json").write_text(json.dumps({"rollout_n": "eight"}))
    unknown_key = own_checkpoint(tmp_path / "eval-keys")
    (unknown_key / "config.json").write_text(json.dumps({"exploit": 1}))
    specs += [("eval", wrong_type), ("eval", unknown_key)]

    results = drive(tmp_path, specs)
    for (name, (file, _, reason)), r in zip(cases.items(), results, strict=False):
        assert r["outcome"] == "refused", (name, r)
        assert r["message"].startswith("CheckpointError"), (name, r)
        assert file in r["message"], (name, r)
        assert reason in r["message"], (name, r)
    scanned, *evals = results[len(cases) :]
    assert scanned["message"].startswith("CheckpointError"), scanned
    assert "trainer_state.json: not valid JSON: nested too deeply" in scanned["message"], scanned
    for r in evals:  # make eval: exit 2, naming the file
        assert r["message"].startswith("ConfigError"), r
        assert "config.json is not a run configuration" in r["message"], r
    assert "unknown config keys ['exploit']" in evals[1]["message"]


# --- 8. the commands: exit 2, one line ---------------------------------------------------------------------


@pytest.mark.integration
def test_convert_refuses_a_hostile_file_with_exit_2_and_one_line(tmp_path: Path) -> None:
    run = own_checkpoint(tmp_path / "run").parent
    bomb = hf.torch_zip(tmp_path / "sft.pth", hf.state_dict(("b", hf.call("builtins", "bytearray", hf.op_int(2**33)))))
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "deepgen_trainer.convert", str(run), "--dit-only", "--merge-onto", str(bomb)],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=WATCHDOG_S, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "sft.pth" in errors[0], errors
    assert "bytearray" in errors[0], errors
    assert not list(tmp_path.glob("run/*.pth")), "nothing is written"
    assert time.monotonic() - start < WATCHDOG_S
