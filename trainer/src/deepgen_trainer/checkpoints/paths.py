"""Files a checkpoint folder names stay inside the folder the user named.

A folder points at other files in three ways: DeepSpeed's ``latest`` (a tag folder), mmengine's
``last_checkpoint`` (a checkpoint path, often absolute) and the shard files themselves, any of which
may be a symlink. `inside` resolves a path (symlinks included) and refuses it, naming the entry, when
it leaves the root; `named_entry` reads a pointer file and resolves what it names relative to the
folder (never the working directory).
"""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A checkpoint entry that points outside the folder the user named."""


def inside(root: Path, path: Path, entry: str) -> Path:
    """`path` resolved (symlinks followed); PathEscapeError naming `entry` when that leaves `root`."""
    root = root.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise PathEscapeError(
            f"{entry} points outside {root} (to {resolved}): a checkpoint may name only files inside the folder "
            "you passed; copy the files in, or pass the folder they are in"
        )
    return resolved


def named_entry(root: Path, pointer: Path) -> Path:
    """The path the pointer file `pointer` (``latest``, ``last_checkpoint``) names, inside `root`.

    A relative name is taken relative to `root`; an absolute one must lie inside `root`, else its last
    component is looked up in `root` (a work dir that was moved keeps its old absolute paths).
    """
    text = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not text or "\0" in text or len(text) > 4096:
        raise PathEscapeError(f"{pointer} does not hold a path")
    named = Path(text)
    if not named.is_absolute():
        return inside(root, root / named, f"{pointer} ({text!r})")
    try:
        return inside(root, named, f"{pointer} ({text!r})")
    except PathEscapeError:
        if named.name in ("", ".", "..") or not (root / named.name).exists():
            raise
        return inside(root, root / named.name, f"{pointer} ({text!r})")
