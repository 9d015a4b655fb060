"""Read an MMEngine Python config file (as the original DeepGen-RL writes them) into plain values.

The original's configs are Python files run by ``mmengine.Config.fromfile``: top-level names become
the config, ``with read_base():`` imports names from sibling config files, and imports of the
original's classes (``deepgen_rl...``, ``xtuner...``, ``transformers.AutoTokenizer``) give the
``type=`` of a dict that mmengine later builds. This reader runs the file the same way (its
``os.environ.get`` calls, f-strings and arithmetic behave as under mmengine) with one difference: an
imported name outside the standard library is never imported; it becomes a `ConfigRef` that records
its dotted name (``torch.bfloat16``, ``transformers.AutoTokenizer.from_pretrained``). So the original
code need not be installed, and reading a config runs none of it.

mmengine's own ``lazy_import=True`` reader cannot serve here: it turns ``import os`` into a lazy
object too, so the SFT-aux config's ``os.environ.get('DATA_ROOT', ...)`` fails at read time.

``read_mmengine_config(path)`` returns the file's top-level names (private ``_names``, imported
names, modules and functions left out, as mmengine's ``Config`` leaves them out) mapped to dicts,
lists, tuples, strings, numbers, booleans, None and `ConfigRef` values.
"""

from __future__ import annotations

import ast
import builtins
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class MMEngineConfigError(ValueError):
    """A config file this reader cannot read; the message names the file and what to change."""


@dataclass(frozen=True)
class ConfigRef:
    """A class, function or constant a config names but that is not imported: its dotted name only."""

    name: str

    @property
    def leaf(self) -> str:
        """The last part of the dotted name (``AutoTokenizer.from_pretrained`` -> ``from_pretrained``)."""
        return self.name.rsplit(".", 1)[-1]


class _Symbol:
    """What an import outside the standard library gives while the file runs: attribute access extends
    the dotted name; calling it is refused (the reader runs none of the original's code)."""

    def __init__(self, name: str, path: Path) -> None:
        self._name = name
        self._path = path

    def __getattr__(self, attr: str) -> _Symbol:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Symbol(f"{self._name}.{attr}", self._path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise MMEngineConfigError(
            f"{self._path}: calls {self._name}(...) while being read; a config read without the original's "
            "code may only name such objects (e.g. as `type=`), not call them. Move the call into a `type=` dict."
        )


_READ_BASE_CALL = "__deepgen_read_base__"


class _ReadBaseToAssignments(ast.NodeTransformer):
    """Turns ``with read_base(): from .x import a, b as c`` into ``a = __deepgen_read_base__('.x', 1, 'a')``
    and ``c = ...('b')``, so the base file's values are bound in order like any other assignment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def visit_With(self, node: ast.With) -> Any:
        if not any(_is_read_base(item.context_expr) for item in node.items):
            return self.generic_visit(node)
        assignments: list[ast.stmt] = []
        for statement in node.body:
            if not isinstance(statement, ast.ImportFrom) or statement.module is None:
                raise MMEngineConfigError(
                    f"{self.path}:{statement.lineno}: only `from .module import name` may stand inside "
                    "`with read_base():`"
                )
            for alias in statement.names:
                if alias.name == "*":
                    raise MMEngineConfigError(
                        f"{self.path}:{statement.lineno}: `from {statement.module} import *` inside read_base(); "
                        "name the imported values"
                    )
                call = ast.Call(
                    func=ast.Name(_READ_BASE_CALL, ast.Load()),
                    args=[ast.Constant(statement.module), ast.Constant(statement.level), ast.Constant(alias.name)],
                    keywords=[],
                )
                target = ast.Name(alias.asname or alias.name, ast.Store())
                assignments.append(ast.copy_location(ast.Assign(targets=[target], value=call), statement))
        return assignments or ast.copy_location(ast.Pass(), node)


def _is_read_base(expression: ast.expr) -> bool:
    if not isinstance(expression, ast.Call):
        return False
    func = expression.func
    return (isinstance(func, ast.Name) and func.id == "read_base") or (
        isinstance(func, ast.Attribute) and func.attr == "read_base"
    )


def _imported_names(tree: ast.Module) -> set[str]:
    """Top-level names bound by import statements (outside read_base): not config values, as in mmengine."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _resolve_base(path: Path, module: str, level: int) -> Path:
    if level == 0:
        raise MMEngineConfigError(
            f"{path}: `with read_base(): from {module} import ...` names an installed package; only relative "
            "imports of config files beside this one (`from .module import name`) can be read"
        )
    directory = path.parent
    for _ in range(level - 1):
        directory = directory.parent
    base = directory.joinpath(*module.split(".")).with_suffix(".py")
    if not base.is_file():
        raise MMEngineConfigError(f"{path}: read_base() imports {'.' * level}{module}, but {base} does not exist")
    return base


def _run(path: Path, reading: tuple[Path, ...]) -> tuple[dict[str, Any], set[str]]:
    """Runs the config file; returns its raw namespace and the names its imports bound."""
    path = path.resolve()
    if path in reading:
        raise MMEngineConfigError(f"{path}: read_base() imports form a cycle: {' -> '.join(map(str, reading))}")
    if not path.is_file():
        raise MMEngineConfigError(f"MMEngine config {path} does not exist")
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise MMEngineConfigError(f"{path}:{error.lineno}: not valid Python: {error.msg}") from error
    imported = _imported_names(tree)
    tree = ast.fix_missing_locations(_ReadBaseToAssignments(path).visit(tree))

    bases: dict[Path, dict[str, Any]] = {}

    def read_base_value(module: str, level: int, name: str) -> Any:
        base = _resolve_base(path, module, level)
        if base not in bases:
            bases[base] = _run(base, (*reading, path))[0]
        if name not in bases[base]:
            raise MMEngineConfigError(f"{path}: read_base() imports {name!r} from {base}, which does not define it")
        return bases[base][name]

    def guarded_import(name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level:
            raise MMEngineConfigError(
                f"{path}: relative import of {'.' * level}{name} outside `with read_base():`; mmengine reads "
                "sibling config files only inside read_base()"
            )
        if name.split(".")[0] in sys.stdlib_module_names:
            return builtins.__import__(name, globals_, locals_, fromlist, level)
        return _Symbol(name if fromlist else name.split(".")[0], path)

    namespace: dict[str, Any] = {
        "__builtins__": {**vars(builtins), "__import__": guarded_import},
        "__file__": str(path),
        "__name__": path.stem,
        _READ_BASE_CALL: read_base_value,
    }
    try:
        exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - a config file is Python, as under mmengine
    except MMEngineConfigError:
        raise
    except Exception as error:
        raise MMEngineConfigError(f"{path}: failed while being read: {type(error).__name__}: {error}") from error
    return namespace, imported


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, _Symbol):
        return ConfigRef(value._name)
    if isinstance(value, dict):
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, types.ModuleType):
        return ConfigRef(value.__name__)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return ConfigRef(f"{value.__module__}.{value.__qualname__}")
    raise MMEngineConfigError(f"{where}: a {type(value).__name__} is not a config value")


def read_mmengine_config(path: str | Path) -> dict[str, Any]:
    """The config's top-level names mapped to plain values (see the module docstring)."""
    path = Path(path)
    namespace, imported = _run(path, ())
    return {
        name: _plain(value, name)
        for name, value in namespace.items()
        if not name.startswith("_")
        and name not in imported
        and not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }
