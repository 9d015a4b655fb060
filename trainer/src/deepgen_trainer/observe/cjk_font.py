"""The font that draws Chinese text on contact sheets, found the same way on the host and in the image.

The trainer depends on the PyPI package noto-cjk-sans-otc (Noto Sans CJK, SIL OFL 1.1: the same
NotoSansCJK-Regular.ttc as Debian's fonts-noto-cjk), so `make setup` and the trainer image both install
it with the trainer and find it through the package, wherever the environment lives. Debian's CJK fonts
are the fallback for an install without that dependency. The collection's Simplified Chinese face is
used (UniGenBench's zh sets are Simplified Chinese; the Japanese face, first in the file, draws some
hanzi in Japanese forms). Without any CJK font, one warning says so and Pillow's built-in font draws
Chinese as boxes.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from PIL import ImageFont

log = logging.getLogger(__name__)

FONT_PACKAGE = "noto_cjk_sans_otc"
PACKAGE_FONT_FILE = "NotoSansCJK-Regular.ttc"
SYSTEM_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # fonts-wqy-microhei
)
PREFERRED_FACE = "Noto Sans CJK SC"


def package_font() -> Path | None:
    """The font file of the noto-cjk-sans-otc dependency, None when it is not installed."""
    spec = importlib.util.find_spec(FONT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FONT_FILE
    return path if path.is_file() else None


def find_cjk_font() -> Path | None:
    """The first CJK font found: the dependency's, else the first of `SYSTEM_FONTS` that exists."""
    return package_font() or next((Path(p) for p in SYSTEM_FONTS if Path(p).is_file()), None)


def face_index(path: Path, family: str = PREFERRED_FACE) -> int:
    """Index of the face named `family` in a font collection (0 when it has none of that name)."""
    index = 0
    while True:
        try:
            face = ImageFont.truetype(str(path), 1, index=index)
        except OSError:  # past the last face
            return 0
        if face.getname()[0] == family:
            return index
        index += 1


@functools.cache
def cjk_face() -> tuple[Path, int] | None:
    """(font file, face index) of the CJK font, looked up once per process; None after one warning."""
    path = find_cjk_font()
    if path is None:
        log.warning(
            "no CJK font found (neither the trainer's dependency noto-cjk-sans-otc nor Debian's fonts-noto-cjk "
            "is installed): Chinese text on contact sheets shows as boxes; make setup installs the font"
        )
        return None
    return path, face_index(path)


def cjk_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The CJK font at `size` px, or Pillow's built-in font (no CJK glyphs) when there is none."""
    face = cjk_face()
    return ImageFont.truetype(str(face[0]), size, index=face[1]) if face else ImageFont.load_default(size)
