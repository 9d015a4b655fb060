"""The contact sheets' CJK font: the trainer's dependency (noto-cjk-sans-otc) is found through its
package, its Simplified Chinese face draws hanzi (not the boxes of a missing glyph), Debian's fonts are
the fallback, and a missing font is one warning."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import ImageFont

from deepgen_trainer.observe import cjk_font as module
from deepgen_trainer.observe.cjk_font import cjk_face, cjk_font, face_index, find_cjk_font, package_font


@pytest.fixture(autouse=True)
def fresh_lookup() -> Iterator[None]:
    cjk_face.cache_clear()
    yield
    cjk_face.cache_clear()


def distinct_glyphs(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> bool:
    """Whether two different hanzi draw differently: a font without them draws the same box twice."""
    cat, dog = font.getmask("猫"), font.getmask("狗")
    return cat.size != dog.size or bytes(cat) != bytes(dog)


def test_the_dependency_font_is_found_and_draws_hanzi() -> None:
    path = find_cjk_font()
    assert path is not None, "the trainer's dependency noto-cjk-sans-otc is missing: run make setup"
    assert path == package_font()
    assert path.name == "NotoSansCJK-Regular.ttc"
    assert path.parent.name == "noto_cjk_sans_otc"  # through the installed package, not a system path
    assert cjk_face() == (path, 2)  # JP, KR, SC, ... in the collection
    font = cjk_font(24)
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert font.getname() == ("Noto Sans CJK SC", "Regular")
    assert distinct_glyphs(font)
    assert not distinct_glyphs(ImageFont.load_default(24))  # the control: Pillow's own font draws boxes


def test_face_index_falls_back_to_the_first_face() -> None:
    path = package_font()
    assert path is not None
    assert face_index(path, "Noto Sans CJK TC") == 3
    assert face_index(path, "No Such Face") == 0


def test_debian_fonts_are_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    installed = package_font()
    assert installed is not None
    monkeypatch.setattr(module, "FONT_PACKAGE", "no_such_font_package")
    monkeypatch.setattr(module, "SYSTEM_FONTS", (str(tmp_path / "absent.ttc"), str(installed)))
    assert find_cjk_font() == installed


def test_no_font_is_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(module, "FONT_PACKAGE", "no_such_font_package")
    monkeypatch.setattr(module, "SYSTEM_FONTS", ())
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        fonts = [cjk_font(11), cjk_font(11), cjk_font(14)]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "no CJK font found (neither the trainer's dependency noto-cjk-sans-otc nor Debian's fonts-noto-cjk "
        "is installed)"
    ]
    assert "make setup installs the font" in caplog.records[0].getMessage()
    assert not any(distinct_glyphs(f) for f in fonts)  # Pillow's built-in font
