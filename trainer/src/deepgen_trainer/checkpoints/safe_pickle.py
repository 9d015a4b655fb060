"""The one unpickler for every pickle inside a checkpoint: a bounded interpreter of the pickle opcodes
``torch.save`` writes (protocol 2), that builds tensors, plain containers, numpy arrays and scalars,
and turns every other class into an inert `ForeignObject`.

Why not torch's own ``torch.load(weights_only=True)``: it was evaluated (torch 2.13) against the
hostile files of issue 20 (tests/trainer/checkpoints/hostile_files.py builds them) and holds against
code execution and state poisoning (it resolves globals from an allowlist and BUILDs only tensors, ``OrderedDict`` and
allowlisted classes), but not against the rest. Its fixed default allowlist, which
``safe_globals`` can only extend, lets a pickle call ``torch.Tensor(4096)`` and the legacy tensor
classes (uninitialised memory into the output, any size), ``bytearray(2**33)`` and, through the memo,
``_codecs.encode`` / ``set`` / ``Counter`` of one large object any number of times (GBs from MBs);
``_rebuild_tensor_v2`` accepts stride-0 and overlapping views and bounds the view against nothing; it
still reads the legacy and tar formats and deflated zip records; and it cannot represent a class it
does not know (mmengine's ``HistoryBuffer``, a DeepSpeed client state's own classes), so genuine SFT
checkpoints would be refused unless every such name were allowlisted beforehand. Measured: it loaded
``torch.Tensor(4096)`` and ``torch.FloatTensor(4096)`` (uninitialised memory) and a legacy-format file,
ran out of a 1.5 GiB allowance on ``bytearray(2**33)``, on 2000 memo copies of a 1 MiB string (a 1.1 MB
file), on a 1.5 GiB DEFLATE record (6 MB) and on casting a stride-0 view (633 bytes), and refused a
genuine mmengine DeepSpeed checkpoint. Python's
``pickle.Unpickler`` with a restricted ``find_class`` (this module before issue 20) fails worse: its
BUILD sets attributes on any object, allowed functions included. So the checks live here, in an
interpreter of ~25 opcodes in the spirit of torch's (no import by name, an explicit table of what may
be called, BUILD only on what it built itself), with these rules:

- **calls** (REDUCE / NEWOBJ): only the functions in `pickle_allowlist.CALLS`, each with its arguments checked
  (types, counts, sizes): the tensor rebuild functions, ``torch.Size``, ``torch.device``, the
  containers (``OrderedDict``, ``Counter``, ``defaultdict``, ``deque``, ``set``, ``frozenset``,
  ``bytearray`` of bytes, never of a size), ``_codecs.encode(str, "latin1")`` (protocol 2's bytes),
  numpy's array / dtype / scalar reconstructors (no object dtype), DeepSpeed's ``ZeroStageEnum`` and
  loss scalers (plain numbers). Anything else named by the file becomes a `ForeignObject` class, which
  refuses to be called (`UnsafePickleError`);
- **BUILD** sets state only on objects this load created: placeholders (stored, never applied), numpy
  arrays (shape × itemsize must equal the bytes given), the few DeepSpeed data classes (numbers only),
  and ``OrderedDict``'s ``_metadata``; never on a class, a function or anything shared;
- **tensors** come only from storages the container reader (`torch_file`) filled from the file: a view
  must lie inside its storage, with no stride 0 over more than one element and no overlap;
- **budget**: every object built is charged (bytes of strings and buffers, 8 per container slot); a
  load may build at most `Budget.limit` (a small multiple of the pickle's size), at most
  `MAX_FOREIGN_CLASSES` placeholder classes (created per load, freed with it); dict keys and set
  elements are strings, bytes, bounded ints, booleans, None, dtypes or objects of this load (no
  crafted hash collisions);
- **walks** of the result (`foreign_classes`, `check_depth`) keep a visited set and a depth limit.
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepgen_trainer.checkpoints.pickle_allowlist import (
    CALLS,
    DATA_CLASSES,
    Budget,
    ForeignObject,
    RefuseCalls,
    UnsafePickleError,
    check_dtype_state,
    data_class,
    global_value,
    new_foreign,
    plain_attributes,
    set_array_state,
)

__all__ = ["Budget", "ForeignObject", "SafeUnpickler", "UnsafePickleError", "foreign_classes", "walk"]

MAX_DEPTH = 64
MAX_FOREIGN_CLASSES = 1024
_MAX_KEY_INT = 2**61 - 2  # ints below the modulus of Python's int hash cannot collide


# --- The interpreter ---------------------------------------------------------------------------------------


class SafeUnpickler:
    """Reads one pickle (bytes) into objects under the rules of the module docstring.

    `persistent_load(pid)` maps a persistent id (torch's ``("storage", type, key, location, numel)``) to
    a `StorageRef`; `budget` bounds what is built; `allow_foreign` False refuses unknown classes instead
    of making placeholders (this trainer's own files hold tensors and primitives only).
    """

    def __init__(
        self,
        data: bytes,
        persistent_load: Callable[[Any], Any],
        budget: Budget,
        allow_foreign: bool = True,
    ) -> None:
        self.data = data
        self.pos = 0
        self.persistent_load = persistent_load
        self.budget = budget
        self.allow_foreign = allow_foreign
        self.memo: dict[int, Any] = {}
        self.foreign: dict[str, type[ForeignObject]] = {}  # per load: freed with it
        # Objects this load created (the only BUILD / SETITEM targets), by id; held so no id is reused.
        self.built: dict[int, Any] = {}

    # reading
    def _read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise UnsafePickleError("the pickle ends in the middle of an opcode (truncated or corrupt)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _readline(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + 256) - self.pos
        if end < 0:
            raise UnsafePickleError("a GLOBAL name longer than 255 bytes")
        line = self._read(end + 1)[:-1]
        return line.decode("utf-8")

    def _placeholder(self, qualified: str) -> type[ForeignObject]:
        if not self.allow_foreign:
            raise UnsafePickleError(
                f"the file names the class {qualified}; this file may hold tensors, numbers, strings, lists and "
                "dicts only"
            )
        if qualified not in self.foreign:
            if len(self.foreign) >= MAX_FOREIGN_CLASSES:
                raise UnsafePickleError(f"the pickle names more than {MAX_FOREIGN_CLASSES} unknown classes")
            self.budget.charge(1024 + len(qualified), "a placeholder class")
            short = qualified.rsplit(".", 1)[-1]
            self.foreign[qualified] = RefuseCalls(short, (ForeignObject,), {"qualified_name": qualified})
        return self.foreign[qualified]

    def _global(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if qualified == "builtins.getattr":
            return _PLACEHOLDER_GETATTR
        if qualified in DATA_CLASSES:
            return data_class(module, name)
        value = global_value(qualified)
        return value if value is not None else self._placeholder(qualified)

    def _new(self, obj: Any, nbytes: int, what: str) -> Any:
        self.budget.charge(nbytes, what)
        self.built[id(obj)] = obj
        return obj

    def _key(self, key: Any) -> Any:
        if type(key) is int and abs(key) > _MAX_KEY_INT:
            raise UnsafePickleError(f"a dict key or set element of {key.bit_length()} bits (hash collisions)")
        if isinstance(key, str | bytes | int | bool | torch.dtype | type(None)) or id(key) in self.built:
            return key
        if isinstance(key, ForeignObject | np.generic):
            return key
        raise UnsafePickleError(f"a dict key or set element of type {type(key).__name__} is not loaded")

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise UnsafePickleError("REDUCE arguments must be a tuple")
        if func is _PLACEHOLDER_GETATTR:
            return self._getattr(*args)
        if isinstance(func, type) and issubclass(func, ForeignObject):
            func(*args)  # refuses, naming the class
        if id(func) not in _CALLABLE:
            name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__name__)}"
            raise UnsafePickleError(f"the pickle calls {name}(...), which is loaded as a value only, never called")
        for item in args:
            if isinstance(item, list | dict | set | frozenset | tuple | bytes | str):
                self.budget.charge(8 * len(item) + (len(item) if isinstance(item, bytes | str) else 0), "a copy")
        result = func(*args)
        return self._new(result, 64, "an object")

    def _getattr(self, owner: Any = None, name: Any = None, *rest: Any) -> type[ForeignObject]:
        """``getattr`` as pickled method references use it, for placeholders only."""
        base = owner if isinstance(owner, type) and issubclass(owner, ForeignObject) else type(owner)
        if rest or not isinstance(name, str) or not issubclass(base, ForeignObject):
            raise UnsafePickleError(
                f"the pickle calls getattr({type(owner).__name__} object, {name!r}); only attributes of unknown "
                "(placeholder) classes are resolved, as inert placeholders"
            )
        return self._placeholder(f"{base.qualified_name}.{name}")

    def _build(self, inst: Any, state: Any) -> None:
        if id(inst) not in self.built:
            raise UnsafePickleError(f"BUILD on a {type(inst).__name__} this load did not create (a shared object)")
        if isinstance(inst, ForeignObject):
            inst.__dict__["state"] = state
        elif type(inst) is np.ndarray:
            set_array_state(inst, state)
        elif isinstance(inst, np.dtype):
            check_dtype_state(inst, state)
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            inst.__dict__.update(state)
        elif f"{type(inst).__module__}.{type(inst).__qualname__}" in DATA_CLASSES:
            inst.__dict__.update(plain_attributes(state, type(inst).__qualname__))
        else:
            raise UnsafePickleError(f"BUILD on a {type(inst).__name__} is not loaded")

    def load(self) -> Any:
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        data, size, budget = self.data, len(self.data), self.budget
        while True:
            if self.pos >= size:
                raise UnsafePickleError("the pickle ends before its STOP opcode (truncated or corrupt)")
            op = data[self.pos]
            self.pos += 1
            handler = _OPS.get(op)
            if handler is None:
                raise UnsafePickleError(
                    f"opcode {bytes([op])!r} at byte {self.pos - 1} is not one torch.save (protocol 2) writes"
                )
            if op == _STOP:
                if len(stack) != 1 or metastack:
                    raise UnsafePickleError("the pickle stops with a malformed stack")
                return stack[0]
            try:
                stack = handler(self, stack, metastack)
            except UnsafePickleError:
                raise
            except _MALFORMED as e:
                raise UnsafePickleError(f"malformed pickle at byte {self.pos}: {type(e).__name__}: {e}") from None
            budget.used += 1  # one stack slot per opcode (inline: this loop is the hot path)
            if budget.used > budget.limit:
                budget.charge(0, "the stack")


_PLACEHOLDER_GETATTR = object()
_CALLABLE = {id(f) for f in CALLS.values()}  # by id: a membership test per REDUCE, not a scan
# What a malformed pickle makes the handlers raise (a short stack, a bad memo index, wrong types, ...).
_MALFORMED = (LookupError, TypeError, ValueError, RuntimeError, ArithmeticError, AttributeError, struct.error)
_STOP = pickle.STOP[0]


# --- Opcodes -----------------------------------------------------------------------------------------------


def _pop_mark(stack: list[Any], metastack: list[list[Any]]) -> tuple[list[Any], list[Any]]:
    return metastack.pop(), stack


def _op_global(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    module = u._readline()
    stack.append(u._global(module, u._readline()))
    return stack


def _op_reduce(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    args = stack.pop()
    stack[-1] = u._call(stack[-1], args)
    return stack


def _op_newobj(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    args = stack.pop()
    cls = stack.pop()
    if not isinstance(args, tuple):
        raise UnsafePickleError("NEWOBJ arguments must be a tuple")
    if isinstance(cls, type) and issubclass(cls, ForeignObject):
        stack.append(u._new(new_foreign(cls, args), 128, "a placeholder object"))
    elif isinstance(cls, type) and f"{cls.__module__}.{cls.__qualname__}" in DATA_CLASSES and not args:
        stack.append(u._new(cls.__new__(cls), 128, "an object"))
    else:
        stack.append(u._call(cls, args))
    return stack


def _op_build(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    state = stack.pop()
    u._build(stack[-1], state)
    return stack


def _op_mark(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    meta.append(stack)
    return []


def _op_tuple(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    outer, items = _pop_mark(stack, meta)
    outer.append(tuple(items))
    u.budget.charge(8 * len(items), "a tuple")
    return outer


def _tuple_n(n: int) -> Callable[[SafeUnpickler, list[Any], list[list[Any]]], list[Any]]:
    def op(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
        if len(stack) < n:
            raise UnsafePickleError(f"TUPLE{n} on a stack of {len(stack)}")
        items = tuple(stack[len(stack) - n :])
        del stack[len(stack) - n :]
        stack.append(items)
        return stack

    return op


def _op_append(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    item = stack.pop()
    _extend(u, stack[-1], [item])
    return stack


def _op_appends(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    outer, items = _pop_mark(stack, meta)
    _extend(u, outer[-1], items)
    return outer


def _extend(u: SafeUnpickler, target: Any, items: list[Any]) -> None:
    if id(target) not in u.built:
        raise UnsafePickleError("APPEND to a list this load did not create")
    u.budget.charge(8 * len(items), "a list")
    if type(target) is list:
        target.extend(items)
    elif isinstance(target, ForeignObject):
        target.values.extend(items)
    else:
        raise UnsafePickleError(f"APPEND to a {type(target).__name__}")


def _op_setitem(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    value = stack.pop()
    key = stack.pop()
    _set_items(u, stack[-1], [key, value])
    return stack


def _op_setitems(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    outer, items = _pop_mark(stack, meta)
    _set_items(u, outer[-1], items)
    return outer


_DICTS = (dict, collections.OrderedDict, collections.Counter, collections.defaultdict)


def _set_items(u: SafeUnpickler, target: Any, items: list[Any]) -> None:
    if id(target) not in u.built or len(items) % 2:
        raise UnsafePickleError("SETITEMS on a dict this load did not create, or an odd number of items")
    u.budget.charge(8 * len(items), "a dict")
    if type(target) in _DICTS:
        store = target
    elif isinstance(target, ForeignObject):
        store = target.items
    else:
        raise UnsafePickleError(f"SETITEMS on a {type(target).__name__}")
    for i in range(0, len(items), 2):
        store[u._key(items[i])] = items[i + 1]


def _push(make: Callable[[SafeUnpickler], Any]) -> Callable[[SafeUnpickler, list[Any], list[list[Any]]], list[Any]]:
    def op(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
        stack.append(make(u))
        return stack

    return op


def _container(factory: type) -> Callable[[SafeUnpickler], Any]:
    return lambda u: u._new(factory(), 64, factory.__name__)


def _string(u: SafeUnpickler, length: int) -> str:
    u.budget.charge(length, "a string")
    return u._read(length).decode("utf-8", "surrogatepass")


def _short_bytes(u: SafeUnpickler) -> bytes:
    return u._read(u._read(1)[0])


def _op_binpersid(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    stack.append(u.persistent_load(stack.pop()))
    return stack


def _memo_get(width: str) -> Callable[[SafeUnpickler, list[Any], list[list[Any]]], list[Any]]:
    def op(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
        index = struct.unpack(width, u._read(struct.calcsize(width)))[0]
        if index not in u.memo:
            raise UnsafePickleError(f"memo entry {index} is read before it is written")
        stack.append(u.memo[index])
        return stack

    return op


def _memo_put(width: str) -> Callable[[SafeUnpickler, list[Any], list[list[Any]]], list[Any]]:
    def op(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
        u.memo[struct.unpack(width, u._read(struct.calcsize(width)))[0]] = stack[-1]
        u.budget.charge(64, "the memo")
        return stack

    return op


def _op_proto(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    if u._read(1)[0] > 2:
        raise UnsafePickleError("pickle protocol > 2: torch.save writes protocol 2 (re-save with torch.save)")
    return stack


def _op_pop(u: SafeUnpickler, stack: list[Any], meta: list[list[Any]]) -> list[Any]:
    stack.pop()
    return stack


def _long1(u: SafeUnpickler) -> int:
    n = u._read(1)[0]
    return int.from_bytes(u._read(n), "little", signed=True)


_OPS: dict[int, Callable[[SafeUnpickler, list[Any], list[list[Any]]], list[Any]]] = {
    pickle.PROTO[0]: _op_proto,
    pickle.STOP[0]: _op_pop,  # handled in `load`
    pickle.GLOBAL[0]: _op_global,
    pickle.REDUCE[0]: _op_reduce,
    pickle.NEWOBJ[0]: _op_newobj,
    pickle.BUILD[0]: _op_build,
    pickle.MARK[0]: _op_mark,
    pickle.POP[0]: _op_pop,
    pickle.TUPLE[0]: _op_tuple,
    pickle.TUPLE1[0]: _tuple_n(1),
    pickle.TUPLE2[0]: _tuple_n(2),
    pickle.TUPLE3[0]: _tuple_n(3),
    pickle.EMPTY_TUPLE[0]: _push(lambda u: ()),
    pickle.EMPTY_LIST[0]: _push(_container(list)),
    pickle.EMPTY_DICT[0]: _push(_container(dict)),
    pickle.APPEND[0]: _op_append,
    pickle.APPENDS[0]: _op_appends,
    pickle.SETITEM[0]: _op_setitem,
    pickle.SETITEMS[0]: _op_setitems,
    pickle.NONE[0]: _push(lambda u: None),
    pickle.NEWTRUE[0]: _push(lambda u: True),
    pickle.NEWFALSE[0]: _push(lambda u: False),
    pickle.BININT[0]: _push(lambda u: struct.unpack("<i", u._read(4))[0]),
    pickle.BININT1[0]: _push(lambda u: u._read(1)[0]),
    pickle.BININT2[0]: _push(lambda u: struct.unpack("<H", u._read(2))[0]),
    pickle.LONG1[0]: _push(_long1),
    pickle.BINFLOAT[0]: _push(lambda u: struct.unpack(">d", u._read(8))[0]),
    pickle.BINUNICODE[0]: _push(lambda u: _string(u, struct.unpack("<I", u._read(4))[0])),
    pickle.SHORT_BINSTRING[0]: _push(lambda u: _short_bytes(u).decode("latin1")),
    pickle.BINPERSID[0]: _op_binpersid,
    pickle.BINGET[0]: _memo_get("<B"),
    pickle.LONG_BINGET[0]: _memo_get("<I"),
    pickle.BINPUT[0]: _memo_put("<B"),
    pickle.LONG_BINPUT[0]: _memo_put("<I"),
}


# --- Walking what was loaded -------------------------------------------------------------------------------


def _children(item: Any) -> list[Any]:
    if isinstance(item, ForeignObject):
        return [item.args, item.state, item.items, item.values]
    if isinstance(item, dict):
        return [*item.keys(), *item.values()]
    if isinstance(item, list | tuple | set | frozenset | collections.deque):
        return list(item)
    return []


def walk(obj: Any, max_depth: int = MAX_DEPTH) -> list[Any]:
    """Every object inside `obj`, each once (a visited set: shared and cyclic references cost nothing
    twice); raises UnsafePickleError past `max_depth` levels of nesting."""
    seen: set[int] = set()
    found: list[Any] = []
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        children = _children(item)
        if children and depth >= max_depth:
            raise UnsafePickleError(f"the loaded object nests deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)
    return found


def foreign_classes(obj: Any) -> set[str]:
    """The class names of every `ForeignObject` (and placeholder class) inside `obj`."""
    names: set[str] = set()
    for item in walk(obj):
        # a placeholder object, or a placeholder class (e.g. a pickled method reference)
        if isinstance(item, ForeignObject) or (isinstance(item, type) and issubclass(item, ForeignObject)):
            names.add(item.qualified_name)
    return names
