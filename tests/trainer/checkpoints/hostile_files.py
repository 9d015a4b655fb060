"""Hostile checkpoint files, as their author would write them (issue 20), and a child-process driver
that loads them through the trainer's entry points under a memory limit.

The builders write the bytes by hand (a tiny pickle assembler and torch's zip layout) so that each
file holds exactly the attack and nothing else. The driver,

    python -m tests.trainer.checkpoints.hostile_files SPEC.json

reads ``[{"entry": ..., "path": ...}, ...]``, caps its own address space at `HEADROOM` above what the
imports took (an allocation the file does not justify fails with MemoryError instead of taking the
machine), loads each path through the entry (``read``: `formats.read_checkpoint` then a cast to fp16
as ``convert --dtype`` does, the path of ``--checkpoint``, ``--merge-onto`` and ``make eval``;
``eval``: ``make eval``'s model loading for an RL checkpoint folder; ``resume``:
`run_checkpoint.load_checkpoint`, the trainer's resume; ``scan``: the trainer's look for the original's
checkpoints in an output dir), and prints one JSON line per path:
``{"path", "outcome": "refused" | "loaded" | "memory", "message", "poisoned"}``. ``poisoned`` is set
when a load changed what torch's own rebuild function or a clean load returns afterwards.
"""

from __future__ import annotations

import io
import json
import pickle
import resource
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

HEADROOM = 1536 * 2**20


# --- A pickle assembler (protocol 2) ---------------------------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value) if -(2**31) <= value < 2**31 else _long(value)


def _long(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


PROTO, STOP, MARK, TUPLE, EMPTY_DICT, EMPTY_LIST, SETITEM, SETITEMS = (
    b"\x80\x02",
    b".",
    b"(",
    b"t",
    b"}",
    b"]",
    b"s",
    b"u",
)
REDUCE, BUILD, NONE, POP, APPEND, BINPERSID = b"R", b"b", b"N", b"0", b"a", b"Q"


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


def state_dict(*items: tuple[str, bytes]) -> bytes:
    """A pickle of ``{name: <object the ops build>}``."""
    body = b"".join(op_str(name) + ops for name, ops in items)
    return PROTO + EMPTY_DICT + MARK + body + SETITEMS + STOP


def tensor_ops(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    """``_rebuild_tensor_v2`` over float storage `key` declared with `numel` elements."""
    pid = MARK + op_str("storage") + op_global("torch", "FloatStorage") + op_str(key) + op_str("cpu")
    pid += op_int(numel) + TUPLE + BINPERSID
    ints = lambda values: MARK + b"".join(op_int(v) for v in values) + TUPLE  # noqa: E731
    args = MARK + pid + op_int(offset) + ints(size) + ints(stride) + b"\x89" + op_global("collections", "OrderedDict")
    args += MARK + TUPLE + REDUCE + TUPLE
    return op_global("torch._utils", "_rebuild_tensor_v2") + args + REDUCE


def call(module: str, name: str, *args: bytes) -> bytes:
    return op_global(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


# --- Containers -----------------------------------------------------------------------------------------


def torch_zip(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None, deflate: bool = False) -> Path:
    """`pickle_bytes` in torch's zip layout (``archive/data.pkl``, ``archive/data/<key>``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        z.writestr("archive/version", "3\n")
    return path


def deflate_bomb(path: Path, nbytes: int) -> Path:
    """A torch zip whose one float storage of `nbytes` zeros is DEFLATE-compressed (a few MB on disk)."""
    numel = nbytes // 4
    pickle_bytes = state_dict(("w", tensor_ops("0", numel, (numel,), (1,))))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            chunk = bytes(64 * 2**20)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
        z.writestr("archive/version", "3\n")
    return path


def legacy_file(path: Path, pickle_bytes: bytes) -> Path:
    """torch's legacy (pre-1.6) format: magic number, protocol, sys info, then the pickle."""
    out = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, out, protocol=2)
    pickle.dump(1001, out, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}},
                out, protocol=2)  # fmt: skip
    out.write(pickle_bytes)
    pickle.dump([], out, protocol=2)  # the storage keys written after the pickle
    path.write_bytes(out.getvalue())
    return path


def tar_with_fifo(path: Path) -> Path:
    """torch's tar format (torch < 0.4) whose ``storages`` member is a FIFO: reading it blocks forever."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "tensors"):
            data = pickle.dumps({} if name == "sys_info" else 0, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


# --- The driver ------------------------------------------------------------------------------------------


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _probe() -> str:
    """What a clean load returns and how torch's rebuild function is set up: changes when a load poisons them."""
    import torch

    clean = Path(sys.argv[1]).with_name("clean.pt")
    if not clean.exists():
        torch.save({"w": torch.arange(4.0)}, clean)
    from deepgen_trainer.checkpoints.formats import read_checkpoint

    loaded = read_checkpoint(clean).tensors["w"]
    fn = torch._utils._rebuild_tensor_v2
    return repr((fn.__defaults__, fn.__kwdefaults__, sorted(vars(fn)), loaded.tolist(), type(loaded).__name__))


def _load(entry: str, path: str) -> str:
    import torch

    if entry == "read":
        from deepgen_trainer.checkpoints.convert import cast_floating
        from deepgen_trainer.checkpoints.formats import read_checkpoint

        tensors = read_checkpoint(path).tensors
        cast = cast_floating(tensors, torch.float16)  # what convert --dtype fp16 does
        return f"{len(cast)} tensors, {sum(t.numel() for t in cast.values())} elements"
    if entry == "eval":  # make eval CKPT=<an RL checkpoint folder>
        from deepgen_trainer.evaluation.evaluate_checkpoint import find_source, load_model

        load_model(find_source(path, {"model": "tiny"}))
        return "model loaded"
    if entry == "resume":
        from deepgen_trainer.checkpoints.run_checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        return f"step {ckpt.step}, optimizer {type(ckpt.optimizer_state).__name__}"
    if entry == "scan":  # the trainer's look for the original's checkpoints in --output_dir
        from deepgen_trainer.checkpoints.original_run import scan_output_dir

        return f"original checkpoints at steps {[c.step for c in scan_output_dir(path).original]}"
    raise ValueError(f"unknown entry {entry!r}")


def main() -> None:
    import torch  # noqa: F401  (the imports count before the limit)

    import deepgen_trainer.checkpoints.convert
    import deepgen_trainer.checkpoints.formats  # noqa: F401

    before = _probe()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + HEADROOM, hard))
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        result = {"path": spec["path"], "entry": spec["entry"]}
        try:
            result.update(outcome="loaded", message=_load(spec["entry"], spec["path"]))
        except MemoryError as e:
            result.update(outcome="memory", message=f"MemoryError {e}")
        except Exception as e:  # every refusal, whatever its type: the test reads the message
            result.update(outcome="refused", message=f"{type(e).__name__}: {e}")
        result["poisoned"] = _probe() != before
        print(json.dumps(result), flush=True)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


if __name__ == "__main__":
    main()
