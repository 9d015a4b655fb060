"""What a checkpoint's pickle may build (`safe_pickle.SafeUnpickler` calls only these): the checked
constructors a REDUCE may call, each checking its arguments' types, counts and sizes; the values a
GLOBAL may name without being callable; the inert `ForeignObject` placeholder every other class
becomes; and the `Budget` a load may spend. See `safe_pickle` for why and how they are used.
"""

from __future__ import annotations

import _codecs
import collections
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

MAX_DIMS = 32


class UnsafePickleError(ValueError):
    """The pickle asks for something outside what `SafeUnpickler` builds; nothing was called."""


class RefuseCalls(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(
            f"the pickle calls {cls.qualified_name}(...), which is not on the allowlist of the checkpoint "
            "loader; refusing to run it (re-save the weights as safetensors or a plain {name: tensor} dict)"
        )


class ForeignObject(metaclass=RefuseCalls):
    """An object of a class outside the allowlist: its class name and pickled state, nothing else.

    `qualified_name` is ``module.Class`` as the pickle names it; `args` are the arguments pickle
    passed to ``__new__``, `state` what it passed to BUILD (None when none), and `items` / `values`
    what it added as to a dict or list subclass.
    """

    qualified_name = "ForeignObject"

    def __repr__(self) -> str:
        return f"<ForeignObject {self.qualified_name}>"


def new_foreign(cls: type[ForeignObject], args: tuple[Any, ...]) -> ForeignObject:
    obj = object.__new__(cls)
    obj.__dict__.update(args=args, state=None, items={}, values=[])
    return obj


class Budget:
    """Bytes a load may still build (Python objects from the pickle, charged as they are made)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise UnsafePickleError(
                f"building {what} exceeds the load's budget of {self.limit} bytes (a small multiple of the "
                "pickle's size): the file asks for far more memory than it holds"
            )


# --- Checked constructors --------------------------------------------------------------------------------


def ints(value: Any, what: str, *, min_value: int = 0) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | torch.Size) or len(value) > MAX_DIMS:
        raise UnsafePickleError(f"{what} must be a tuple of at most {MAX_DIMS} ints, got {type(value).__name__}")
    if not all(type(v) is int and min_value <= v < 2**62 for v in value):
        raise UnsafePickleError(f"{what} must hold ints >= {min_value}, got {list(value)[:8]}")
    return tuple(value)


def check_view(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...], where: str) -> None:
    """Refuse a view (`size`, `stride`, `offset`) that reads outside a storage of `numel` elements,
    repeats an element (stride 0 over a dimension longer than 1) or overlaps itself."""
    if len(size) != len(stride):
        raise UnsafePickleError(f"{where}: size {size} and stride {stride} differ in length")
    if math.prod(size) == 0:
        if offset > numel:
            raise UnsafePickleError(f"{where}: offset {offset} lies past its storage of {numel} elements")
        return
    dims = sorted((st, sz) for sz, st in zip(size, stride, strict=True) if sz > 1)
    span = 1  # elements covered by the dimensions seen so far, innermost first
    for st, sz in dims:
        if st < span:
            what = "a stride-0 view" if st == 0 else "an overlapping view"
            raise UnsafePickleError(
                f"{where}: {what} (size {size}, stride {stride}) would repeat elements of its storage; a "
                "checkpoint holds each element once"
            )
        span = st * (sz - 1) + span
    extent = offset + sum((sz - 1) * st for sz, st in zip(size, stride, strict=True)) + 1
    if extent > numel:
        raise UnsafePickleError(
            f"{where}: a view of {extent} elements (offset {offset}, size {size}, stride {stride}) reads past its "
            f"storage of {numel} elements: the file does not hold the data it declares"
        )


class StorageRef:
    """A storage the container reader filled from the file: `storage` (untyped, `nbytes` bytes) and its dtype."""

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype, key: str) -> None:
        self.storage = storage
        self.dtype = dtype
        self.key = key
        self.numel = storage.nbytes() // dtype.itemsize


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(storage, StorageRef):
        raise UnsafePickleError(f"_rebuild_tensor_v2 needs a storage from the file, got {type(storage).__name__}")
    size, stride = ints(size, "tensor size"), ints(stride, "tensor stride")
    if type(storage_offset) is not int or storage_offset < 0:
        raise UnsafePickleError(f"tensor storage offset must be an int >= 0, got {storage_offset!r}")
    if backward_hooks or metadata or type(requires_grad) is not bool:
        raise UnsafePickleError("a tensor with backward hooks or Python metadata is not loaded (weights only)")
    check_view(storage.numel, storage_offset, size, stride, f"tensor over storage {storage.key}")
    tensor = torch.empty((0,), dtype=storage.dtype, device=storage.storage.device)
    tensor.set_(storage.storage, storage_offset, size, stride)
    tensor.requires_grad_(requires_grad and tensor.is_floating_point())
    return tensor


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool or backward_hooks or state:
        raise UnsafePickleError("a Parameter must wrap a tensor of the file, without hooks or attributes")
    return torch.nn.Parameter(data, requires_grad=requires_grad)


_PLAIN = (int, float, bool, str, type(None), torch.dtype)


def plain_attributes(state: Any, what: str) -> dict[str, Any]:
    """A BUILD / tensor state that sets only public attributes to numbers, strings, None or dtypes."""
    if state is None:
        return {}
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and k.isidentifier() and not k.startswith("_") and isinstance(v, _PLAIN)
        for k, v in state.items()
    ):
        raise UnsafePickleError(f"{what}'s state must map public names to numbers, strings, None or dtypes")
    return state


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    # torch.save writes a tensor with Python attributes this way (DeepSpeed's ZeRO-3 `ds_id`).
    if func is not _rebuild_tensor_v2 or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError("_rebuild_from_type_v2 is loaded only for a plain tensor or Parameter")
    if not isinstance(args, tuple):
        raise UnsafePickleError("_rebuild_from_type_v2's arguments must be a tuple")
    tensor = _rebuild_tensor_v2(*args)
    if new_type is torch.nn.Parameter:
        tensor = torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    for name, value in plain_attributes(state, "a tensor").items():
        setattr(tensor, name, value)
    return tensor


def _numpy_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if not isinstance(name, str) or len(name) > 8 or align is not False or copy is not True:
        raise UnsafePickleError(f"numpy.dtype{(name, align, copy)!r}: only a fresh copy of a named dtype")
    dtype = np.dtype(name)
    if dtype.kind not in "biufc" or dtype.itemsize > 16:
        raise UnsafePickleError(f"numpy dtype {name!r}: only bool, integer, float and complex dtypes are loaded")
    return np.dtype(name, align, copy)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy pickles an array as an empty one plus a BUILD with the data (checked in `_build`).
    if subtype is not np.ndarray or shape != (0,) or dtype != b"b":
        raise UnsafePickleError("numpy _reconstruct is loaded only as numpy itself writes it (an empty ndarray)")
    return np.ndarray.__new__(np.ndarray, (0,), "b")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise UnsafePickleError("a numpy scalar must be a bool or numeric dtype with its bytes")
    if len(data) != dtype.itemsize:
        raise UnsafePickleError(f"a numpy {dtype} scalar holds {dtype.itemsize} bytes, the file gives {len(data)}")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is loaded only as protocol 2's bytes: encode(str, 'latin1')")
    return _codecs.encode(text, "latin1")


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, bytes):
        raise UnsafePickleError("bytearray is built only from bytes of the file, never from a size")
    return bytearray(data)


def _torch_size(dims: Any = ()) -> torch.Size:
    return torch.Size(ints(dims, "torch.Size"))


def _torch_device(kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or len(kind) > 32 or not (index is None or type(index) is int):
        raise UnsafePickleError("torch.device takes a short string and an optional int")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _from_iterable(factory: Callable[..., Any], name: str) -> Callable[..., Any]:
    def build(items: Any = (), *rest: Any) -> Any:
        if not isinstance(items, list | tuple | dict | set | frozenset) or len(rest) > 1:
            raise UnsafePickleError(f"{name} is built only from a list, tuple, dict or set of the file")
        if rest and not (rest[0] is None or type(rest[0]) is int):
            raise UnsafePickleError(f"{name}'s second argument must be None or an int")
        return factory(items, *rest)

    return build


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    if not isinstance(items, list | tuple) or any(not isinstance(i, tuple) or len(i) != 2 for i in items):
        raise UnsafePickleError("OrderedDict is built only from a list of (key, value) pairs")
    return collections.OrderedDict(items)


_FACTORIES = (list, dict, int, float, set, str)


def _defaultdict(factory: Any = None, *rest: Any) -> collections.defaultdict:
    if rest or not (factory is None or factory in _FACTORIES):
        raise UnsafePickleError(f"defaultdict's factory must be one of {[f.__name__ for f in _FACTORIES]} or None")
    return collections.defaultdict(factory)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise UnsafePickleError("complex takes two numbers")
    return complex(real, imag)


def _zero_stage_enum(value: Any) -> Any:
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if type(value) is not int or not 0 <= value <= 3:
        raise UnsafePickleError(f"ZeroStageEnum must be 0..3, got {value!r}")
    return ZeroStageEnum(value)


def data_class(module: str, name: str) -> type:
    import importlib

    return getattr(importlib.import_module(module), name)


# Plain DeepSpeed data classes whose objects DeepSpeed's own resume uses (loss scalers, fragment addresses):
# built by NEWOBJ without calling __init__, their BUILD state must be a dict of numbers, strings, None or dtypes.
DATA_CLASSES = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
}
_NUMPY_MODULES = ("numpy.core", "numpy._core")


def _calls() -> dict[str, Callable[..., Any]]:
    """Global name → the checked function the pickle's REDUCE calls instead."""
    calls: dict[str, Callable[..., Any]] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Size": _torch_size,
        "torch.device": _torch_device,
        "collections.OrderedDict": _ordered_dict,
        "collections.Counter": _from_iterable(collections.Counter, "Counter"),
        "collections.deque": _from_iterable(collections.deque, "deque"),
        "collections.defaultdict": _defaultdict,
        "builtins.set": _from_iterable(set, "set"),
        "builtins.frozenset": _from_iterable(frozenset, "frozenset"),
        "builtins.bytearray": _bytearray,
        "builtins.complex": _complex,
        "_codecs.encode": _latin1,
        "numpy.dtype": _numpy_dtype,
        "deepspeed.runtime.zero.config.ZeroStageEnum": _zero_stage_enum,
    }
    for module in _NUMPY_MODULES:
        calls[f"{module}.multiarray._reconstruct"] = _numpy_reconstruct
        calls[f"{module}.multiarray.scalar"] = _numpy_scalar
    return calls


CALLS = _calls()
# Globals that are values only (arguments of the calls above), never called.
_VALUES: dict[str, Any] = {
    "torch.Tensor": torch.Tensor,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,
    "numpy.ndarray": np.ndarray,
    **{f"builtins.{f.__name__}": f for f in _FACTORIES},
}
# torch.FloatStorage, torch.BFloat16Storage, ...: how persistent ids name a storage's dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    f"torch.{name}": dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}


class StorageType:
    """``torch.<X>Storage`` as a pickle names it: only its dtype (persistent ids carry it)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def global_value(name: str) -> Any:
    if name in CALLS:
        return CALLS[name]
    if name in _VALUES:
        return _VALUES[name]
    if name in _STORAGE_DTYPES:
        return StorageType(_STORAGE_DTYPES[name])
    if name.startswith("torch.") and isinstance(getattr(torch, name[6:], None), torch.dtype):
        return getattr(torch, name[6:])
    return None


def set_array_state(arr: np.ndarray, state: Any) -> None:
    if not isinstance(state, tuple) or len(state) != 5:
        raise UnsafePickleError("a numpy array's state must be (version, shape, dtype, fortran, bytes)")
    version, shape, dtype, fortran, raw = state
    shape = ints(shape, "numpy shape")
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
        raise UnsafePickleError("numpy arrays of object or structured dtypes are not loaded")
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.itemsize:
        raise UnsafePickleError(
            f"a numpy array of shape {shape} and dtype {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, the "
            f"file gives {len(raw) if isinstance(raw, bytes) else type(raw).__name__}"
        )
    arr.__setstate__((version, shape, dtype, bool(fortran), raw))


def check_dtype_state(dtype: np.dtype, state: Any) -> None:
    ok = (
        isinstance(state, tuple)
        and len(state) == 8
        and state[0] in (3, 4)
        and state[1] in ("<", ">", "|", "=")
        and state[2:5] == (None, None, None)
        and state[5:7] in ((-1, -1), (dtype.itemsize, dtype.alignment))
        and type(state[7]) is int
        and state[7] == dtype.flags
    )
    if not ok:
        raise UnsafePickleError(f"numpy dtype state {state!r} is not a plain dtype's")
