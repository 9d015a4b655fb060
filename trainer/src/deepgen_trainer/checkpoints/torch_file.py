"""`load_torch_file`: the one reader of ``torch.save`` files in this trainer. Every checkpoint-derived
``.pt`` / ``.pth`` / ``.bin`` goes through it: `formats` (``--checkpoint``, ``--merge-onto``, ``make
eval``, DeepSpeed's ``zero_to_fp32`` shards), this trainer's resume (`run_checkpoint`) and DeepSpeed's
engine resume (`engine.optim`).

The container is checked before anything is unpickled:

- only the zip format ``torch.save`` writes since torch 1.6: the legacy (raw pickle) and tar formats
  are refused (their storages are sized by the pickle, not the file, and torch's legacy reader writes
  a ``.patch`` file for a persistent id naming a source module; a tar member may be a FIFO or a link);
- the file itself must be a regular file (opened without blocking on a FIFO);
- every zip record must be stored (no DEFLATE: 2.5 MB that inflate to 2.5 GiB), unencrypted, inside
  the file and overlapping no other record (no record read twice);
- every storage's declared size (numel × itemsize) must equal its record's size: no tensor is built
  from memory the file did not fill.

The pickle (``data.pkl``) is then read by `safe_pickle.SafeUnpickler` with a budget of
`BUDGET_PER_PICKLE_BYTE` × its size + `BUDGET_BASE` bytes of Python objects; tensors come only from
the records (at most the file's size in total). With ``mmap=True`` records are views of one
private mapping of the file, as torch's own loader makes them with ``mmap=True``.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepgen_trainer.checkpoints.pickle_allowlist import Budget, StorageRef, StorageType, UnsafePickleError
from deepgen_trainer.checkpoints.safe_pickle import SafeUnpickler, walk

BUDGET_PER_PICKLE_BYTE = 16
BUDGET_BASE = 16 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
MapLocation = str | torch.device | Callable[[torch.UntypedStorage, str], torch.UntypedStorage] | None


def load_torch_file(path: str | Path, map_location: MapLocation = "cpu", *, mmap: bool = False,
                    allow_foreign: bool = True) -> Any:  # fmt: skip
    """The object `torch.save` wrote to `path`, read under the rules of the module docstring.

    `map_location`: a device (or its name) the storages are moved to, or torch's callable
    ``(storage, location) -> storage``; None keeps them on the CPU. `allow_foreign` False refuses
    objects of unknown classes instead of loading them as `safe_pickle.ForeignObject` placeholders.
    Raises UnsafePickleError with the reason (the caller names the file). The caller confines `path`
    to the folder the user named (`paths.inside`).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePickleError("not a regular file (a FIFO, device or directory)")
        size = os.fstat(fd).st_size
        head = f.read(512)
        if not head.startswith(_ZIP_MAGIC):
            raise UnsafePickleError(f"{_format_name(head)} is not read (only torch's zip format is): re-save it with "
                                    "torch.save under torch >= 1.6, or as safetensors")  # fmt: skip
        archive = _Archive(f, size)
        pickle_bytes = archive.read(archive.pickle_name)
        file_storage = None
        if mmap:
            file_storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        storages: dict[str, StorageRef] = {}

        def persistent_load(pid: Any) -> StorageRef:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise UnsafePickleError(f"persistent id {str(pid)[:80]} is not a torch storage")
            _, storage_type, key, location, numel = pid
            if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int:
                raise UnsafePickleError(f"persistent id {str(pid)[:80]} is not a torch storage")
            if key in storages:
                if storages[key].dtype != storage_type.dtype:
                    raise UnsafePickleError(f"storage {key} is declared with two dtypes")
                return storages[key]
            record = f"{archive.prefix}data/{key}"
            nbytes = numel * storage_type.dtype.itemsize
            held = archive.record_size(record)
            if numel < 0 or nbytes != held:
                raise UnsafePickleError(
                    f"storage {key} declares {numel} elements of {storage_type.dtype} ({nbytes} bytes), its record "
                    f"holds {held} bytes"
                )
            if file_storage is not None:
                start = archive.data_start(record)
                storage = file_storage[start : start + nbytes]
            else:
                storage = archive.read_storage(record)
            storages[key] = StorageRef(_place(storage, location, map_location), storage_type.dtype, key)
            return storages[key]

        budget = Budget(BUDGET_PER_PICKLE_BYTE * len(pickle_bytes) + BUDGET_BASE)
        obj = SafeUnpickler(pickle_bytes, persistent_load, budget, allow_foreign=allow_foreign).load()
    walk(obj)  # refuses nesting past the depth limit
    return obj


def _format_name(head: bytes) -> str:
    if head[257:262] == b"ustar":
        return "a tar-format torch file"
    if head[:1] == b"\x80":
        return "a legacy (non-zip) torch file"
    return "a file that is not a torch zip file"


def _place(storage: torch.UntypedStorage, location: Any, map_location: MapLocation) -> torch.UntypedStorage:
    if map_location is None:
        return storage
    if callable(map_location):
        return map_location(storage, str(location))
    device = torch.device(map_location)
    if device.type == "cpu":
        return storage
    return torch.empty(0, dtype=torch.uint8).set_(storage).to(device).untyped_storage()


class _Archive:
    """The records of a torch zip file, checked (see the module docstring): name → (data start, size)."""

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, ValueError, OSError) as e:
            raise UnsafePickleError(f"not a readable zip file: {e}") from None
        self.records: dict[str, tuple[int, int]] = {}
        spans = []
        for info in infos:
            if info.filename in self.records:
                raise UnsafePickleError(f"zip record {info.filename!r} appears twice")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise UnsafePickleError(
                    f"zip record {info.filename!r} is compressed (method {info.compress_type}); torch.save stores "
                    "records uncompressed, and a compressed record may inflate far beyond the file"
                )
            if info.flag_bits & 0x1:
                raise UnsafePickleError(f"zip record {info.filename!r} is encrypted")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size:
                raise UnsafePickleError(f"zip record {info.filename!r} lies past the end of the file")
            magic, _, flags, method, *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            if magic != _ZIP_MAGIC or method != zipfile.ZIP_STORED or flags & 0x1:
                raise UnsafePickleError(f"zip record {info.filename!r}: its local header disagrees with the directory")
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if start + info.file_size > size:
                raise UnsafePickleError(f"zip record {info.filename!r} declares bytes past the end of the file")
            self.records[info.filename] = (start, info.file_size)
            spans.append((info.header_offset, start + info.file_size, info.filename))
        spans.sort()
        for (_, end, name), (begin, _, other) in itertools.pairwise(spans):
            if begin < end:
                raise UnsafePickleError(f"zip records {name!r} and {other!r} overlap (the same bytes read twice)")
        pickles = [name for name in self.records if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnsafePickleError(f"a torch zip file holds one data.pkl, this one {len(pickles)}")
        self.pickle_name = pickles[0]
        self.prefix = self.pickle_name[: -len("data.pkl")]
        if self.records.get(f"{self.prefix}byteorder", (0, 0))[1] and self.read(f"{self.prefix}byteorder") != b"little":
            raise UnsafePickleError("a big-endian torch file is not read (re-save it on a little-endian machine)")

    def record_size(self, name: str) -> int:
        if name not in self.records:
            raise UnsafePickleError(f"the pickle names a storage record {name!r} the file does not hold")
        return self.records[name][1]

    def data_start(self, name: str) -> int:
        return self.records[name][0]

    def read(self, name: str) -> bytes:
        start, size = self.records[name]
        self.f.seek(start)
        data = self.f.read(size)
        if len(data) != size:
            raise UnsafePickleError(f"zip record {name!r} is shorter than declared")
        return data

    def read_storage(self, name: str) -> torch.UntypedStorage:
        start, size = self.records[name]
        buffer = torch.empty(size, dtype=torch.uint8)
        self.f.seek(start)
        if size and self.f.readinto(memoryview(buffer.numpy()).cast("B")) != size:
            raise UnsafePickleError(f"zip record {name!r} is shorter than declared")
        return buffer.untyped_storage()
