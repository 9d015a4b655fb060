"""Read torch files that hold more than tensors (DeepSpeed, mmengine and xtuner checkpoints) without
running pickled code.

`restricted_torch_load` is ``torch.load`` with a pickle module whose unpickler builds only an
allowlist: tensors and storages (torch's own rebuild functions), dtypes, ``torch.Size``, plain
containers (``OrderedDict``, ``Counter``, ``defaultdict``, sets, ...), numpy arrays, dtypes and
scalars, and DeepSpeed's ``ZeroStageEnum``. Any other class becomes a `ForeignObject`: an inert
placeholder that keeps the class name and the pickled state (itself unpickled under the same rules)
and has no behaviour. Pickle creates plain objects (``object.__reduce_ex__`` of protocol ≥ 2, e.g.
mmengine's ``HistoryBuffer`` or DeepSpeed's ``LossScaler``) by ``cls.__new__(cls)`` plus a state;
that gives a placeholder. A pickle that *calls* something outside the allowlist (``REDUCE``: how a
hostile ``__reduce__`` returning ``(os.system, ("cmd",))`` is encoded) is refused with
`UnsafePickleError` naming the callable, before anything is called. ``getattr`` is allowed on a
placeholder only (pickle's encoding of a method reference such as mmengine's
``HistoryBuffer.min``), and gives another placeholder.
"""

from __future__ import annotations

import _codecs
import _compat_pickle
import builtins
import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to call a function or class outside the allowlist; nothing was called."""


class _RefuseCalls(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(
            f"the pickle calls {cls.qualified_name}(...), which is not on the allowlist of "
            "restricted_torch_load; refusing to run it (re-save the weights as safetensors or a plain "
            "{name: tensor} dict)"
        )


class ForeignObject(metaclass=_RefuseCalls):
    """An object of a class outside the allowlist: its class name and pickled state, nothing else.

    `qualified_name` is ``module.Class`` as the pickle names it; `args` are the arguments pickle
    passed to ``__new__``, `state` what it passed to ``__setstate__`` (None when it passed none), and
    `items` / `values` what it added as to a dict or list subclass.
    """

    qualified_name = "ForeignObject"

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, values=[])
        return obj

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS of a pickled dict subclass
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:  # APPENDS of a pickled list subclass
        self.__dict__["values"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["values"].extend(values)

    def __repr__(self) -> str:
        return f"<ForeignObject {self.qualified_name}>"


_placeholders: dict[str, type[ForeignObject]] = {}


def _placeholder(qualified_name: str) -> type[ForeignObject]:
    if qualified_name not in _placeholders:
        short = qualified_name.rsplit(".", 1)[-1]
        _placeholders[qualified_name] = _RefuseCalls(short, (ForeignObject,), {"qualified_name": qualified_name})
    return _placeholders[qualified_name]


def _numpy_globals() -> dict[str, Any]:
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    # numpy 2 pickles under numpy._core, numpy 1 under numpy.core: accept both names.
    for package in ("numpy.core", "numpy._core"):
        allowed[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
        allowed[f"{package}.multiarray.scalar"] = multiarray.scalar
        allowed[f"{package}.numeric._frombuffer"] = numeric._frombuffer
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return allowed


_ZERO_STAGE_ENUM = "deepspeed.runtime.zero.config.ZeroStageEnum"


def _zero_stage_enum() -> Any:
    """DeepSpeed's ZeroStageEnum, imported only when a file names it (importing DeepSpeed is slow)."""
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
    except ImportError:  # without DeepSpeed its enum loads as a refusal, like any other unknown call
        return _placeholder(_ZERO_STAGE_ENUM)
    return ZeroStageEnum


def _allowed_globals() -> dict[str, Any]:
    from torch import _utils
    from torch._tensor import _rebuild_from_type_v2

    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "collections.defaultdict": collections.defaultdict,
        "collections.deque": collections.deque,
        "_codecs.encode": _codecs.encode,  # how protocol 2 writes bytes (numpy array buffers)
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    for name in ("set", "frozenset", "slice", "complex", "range", "bytearray", "bytes", "int", "float", "str", "bool"):
        allowed[f"builtins.{name}"] = getattr(builtins, name)
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
        "_rebuild_device_tensor_from_numpy",
    ):
        if hasattr(_utils, name):
            allowed[f"torch._utils.{name}"] = getattr(_utils, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            allowed[f"torch.{name}"] = value
    allowed.update(_numpy_globals())
    return allowed


_ALLOWED: dict[str, Any] | None = None


def _placeholder_getattr(obj: Any, name: str) -> type[ForeignObject]:
    """``getattr`` as pickled method references use it, for placeholders only: a placeholder of the attribute."""
    owner = obj if isinstance(obj, type) and issubclass(obj, ForeignObject) else type(obj)
    if not issubclass(owner, ForeignObject):
        raise UnsafePickleError(
            f"the pickle calls getattr({type(obj).__name__!s} object, {name!r}); only attributes of unknown "
            "(placeholder) classes are resolved, as inert placeholders"
        )
    return _placeholder(f"{owner.qualified_name}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves globals from the allowlist only (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        # Protocol 2 writes Python 2 names (__builtin__, commands for subprocess): map them back as
        # pickle's own find_class does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified == "builtins.getattr":
            return _placeholder_getattr
        if qualified == _ZERO_STAGE_ENUM:
            return _zero_stage_enum()
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        return _placeholder(qualified)


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: a name, an Unpickler class and a load function.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="deepgen_restricted_pickle", Unpickler=RestrictedUnpickler, load=_load
)


def restricted_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path)`` through `RestrictedUnpickler`: tensors as usual, unknown classes as
    `ForeignObject`. Raises `UnsafePickleError` (naming the callable) for a pickle that would call
    anything outside the allowlist."""
    return torch.load(path, map_location=map_location, pickle_module=_RESTRICTED_PICKLE, weights_only=False, mmap=mmap)


def foreign_classes(obj: Any) -> set[str]:
    """The class names of every `ForeignObject` inside `obj` (dicts, lists, tuples, sets, states)."""
    found: set[str] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, ForeignObject):
            found.add(item.qualified_name)
            stack.extend([item.args, item.state, item.items, item.values])
        elif isinstance(item, type) and issubclass(item, ForeignObject):  # e.g. a pickled method reference
            found.add(item.qualified_name)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
    return found
