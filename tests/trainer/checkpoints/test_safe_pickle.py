"""deepgen_trainer.checkpoints.safe_pickle: what the restricted unpickler builds, what it turns into placeholders,
and that a pickle which would run code is refused before anything runs."""

from __future__ import annotations

import builtins
import os
import subprocess
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deepgen_trainer.checkpoints.safe_pickle import (
    ForeignObject,
    UnsafePickleError,
    foreign_classes,
    restricted_torch_load,
)


@dataclass
class Unknown:
    value: int
    history: np.ndarray


class Stats:
    def mean(self) -> float:
        return 0.0


def test_tensors_containers_and_numpy_round_trip(tmp_path: Path) -> None:
    obj = {
        "w": torch.randn(3, 4),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.zeros(2)),
        "shape": torch.Size([2, 3]),
        "dtype": torch.float16,
        "ordered": OrderedDict(a=1, b=[1.5, "x", None]),
        "counter": Counter({3: 2}),
        "set": {1, 2},
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.float64(2.5),
        "bytes": b"\x00\xff",
    }
    torch.save(obj, tmp_path / "f.pt")
    got = restricted_torch_load(tmp_path / "f.pt")
    for key in ("w", "bf16", "param"):
        torch.testing.assert_close(got[key], obj[key], rtol=0, atol=0)
    assert isinstance(got["param"], torch.nn.Parameter)
    assert got["shape"] == torch.Size([2, 3])
    assert got["dtype"] is torch.float16
    assert got["ordered"] == obj["ordered"]
    assert isinstance(got["ordered"], OrderedDict)
    assert got["counter"] == Counter({3: 2})
    assert got["set"] == {1, 2}
    np.testing.assert_array_equal(got["array"], obj["array"])
    assert got["scalar"] == 2.5
    assert got["bytes"] == b"\x00\xff"
    assert foreign_classes(got) == set()


class ConfigDict(dict):
    """Like mmengine's ConfigDict or addict.Dict: a dict subclass, pickled with SETITEMS."""


def test_dict_subclasses_keep_their_items(tmp_path: Path) -> None:
    torch.save({"cfg": ConfigDict(lr=0.5, steps=[1, 2])}, tmp_path / "f.pt")
    cfg = restricted_torch_load(tmp_path / "f.pt")["cfg"]
    assert isinstance(cfg, ForeignObject)
    assert cfg.items == {"lr": 0.5, "steps": [1, 2]}


def test_unknown_classes_become_inert_placeholders(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "note": Unknown(3, np.ones(2)), "method": Stats().mean}, tmp_path / "f.pt")
    got = restricted_torch_load(tmp_path / "f.pt")
    note = got["note"]
    assert isinstance(note, ForeignObject)
    assert note.qualified_name == f"{__name__}.Unknown"
    assert note.state["value"] == 3  # the pickled state, itself built under the same rules
    np.testing.assert_array_equal(note.state["history"], np.ones(2))
    assert foreign_classes(got) == {f"{__name__}.Unknown", f"{__name__}.Stats.mean"}
    with pytest.raises(
        UnsafePickleError, match=r"calls tests\.trainer\.checkpoints\.test_safe_pickle\.Unknown\(\.\.\.\)"
    ):
        type(note)(1)  # a placeholder class is not callable: it has no behaviour to run


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (lambda marker: (os.system, (f"touch {marker}",)), r"posix\.system"),
        (lambda marker: (subprocess.check_call, (["touch", str(marker)],)), r"subprocess\.check_call"),
        (lambda marker: (builtins.exec, (f"open({str(marker)!r}, 'w')",)), r"builtins\.exec"),
        (lambda marker: (getattr, (str(marker), "upper")), r"getattr\(str object, 'upper'\)"),
    ],
    ids=["os.system", "subprocess", "exec", "getattr"],
)
def test_a_pickle_that_calls_code_is_refused_before_it_runs(tmp_path: Path, payload, named: str) -> None:
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self) -> tuple[object, ...]:
            return payload(marker)

    torch.save({"w": torch.ones(1), "evil": Hostile()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=named):
        restricted_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_deepspeed_zero_stage_enum_is_allowed(tmp_path: Path) -> None:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ZeroStageEnum.weights}, tmp_path / "optim.pt")
    assert restricted_torch_load(tmp_path / "optim.pt")["zero_stage"] == 3
