"""Contact sheets: a valid PNG of the expected grid size, images and verdict marks where they belong."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from deepgen_common.types import ImageResult
from deepgen_trainer.observe.contact_sheet import (
    CELL_SIDE,
    LINE_HEIGHT,
    PADDING,
    PROMPT_LINES,
    TESTPOINT_LINES,
    SheetEntry,
    cell_size,
    save_contact_sheet,
    sheet_prompt_ids,
    sheet_size,
)

GREEN, RED = (46, 160, 67), (207, 34, 46)


def _png(color: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _verdict(pid: str, testpoints: list[str], scores: list[int] | None, status: str = "ok") -> ImageResult:
    return ImageResult(pid, 0, f"prompt {pid}", testpoints, scores, None, status, "" if status == "ok" else "why")  # type: ignore[arg-type]


def test_grid_size_follows_the_cells_and_columns():
    width, height = cell_size()
    assert (width, height) == (CELL_SIDE, CELL_SIDE + 2 * PADDING + (PROMPT_LINES + TESTPOINT_LINES) * LINE_HEIGHT)
    assert sheet_size(8) == (4 * width, 2 * height)
    assert sheet_size(5) == (4 * width, 2 * height)
    assert sheet_size(3) == (3 * width, height)
    with pytest.raises(ValueError, match=">= 1 entry"):
        sheet_size(0)


def test_the_subset_is_the_first_prompts():
    assert sheet_prompt_ids([str(i) for i in range(20)]) == [str(i) for i in range(8)]
    assert sheet_prompt_ids(["a", "b"]) == ["a", "b"]


def test_sheet_png_shows_images_and_verdicts(tmp_path: Path):
    many = [f"Attribute - T{k}" for k in range(12)]  # more testpoints than lines: "+k more"
    entries = [
        SheetEntry("0", "a blue square", _png("blue"), _verdict("0", ["Style", "Attribute - Color"], [1, 0])),
        SheetEntry("1", "一只红色的猫" * 30, _png("red", (32, 48)), _verdict("1", ["属性-颜色"], [1])),
        SheetEntry("2", "a long prompt " * 20, _png("white"), _verdict("2", many, [1] * 12)),
        SheetEntry("3", "unparseable", _png("black"), _verdict("3", ["Style"], None, "parse_failure")),
        SheetEntry("4", "never judged", None, None),
    ]
    path = save_contact_sheet(tmp_path / "step-1" / "contact_sheet.png", entries)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == sheet_size(5) == (4 * CELL_SIDE, 2 * cell_size()[1])
        rgb = sheet.convert("RGB")
        assert rgb.getpixel((CELL_SIDE // 2, CELL_SIDE // 2)) == (0, 0, 255)  # image 0, scaled to the cell
        assert rgb.getpixel((CELL_SIDE + 5, 5)) == (255, 0, 0)  # image 1 in the second cell
        first_mark_y = CELL_SIDE + PADDING + PROMPT_LINES * LINE_HEIGHT + 5
        assert rgb.getpixel((PADDING + 3, first_mark_y)) == GREEN  # "Style": satisfied
        assert rgb.getpixel((PADDING + 3, first_mark_y + LINE_HEIGHT)) == RED  # "Attribute - Color": not
        assert rgb.getpixel((3 * CELL_SIDE + PADDING + 3, first_mark_y)) not in (GREEN, RED)  # parse failure: no mark
        # Text is wrapped in pixels: the long CJK prompt of cell 1 does not run into cell 2's margin.
        prompt_rows = range(CELL_SIDE + PADDING, CELL_SIDE + PADDING + PROMPT_LINES * LINE_HEIGHT)
        assert {rgb.getpixel((2 * CELL_SIDE + dx, y)) for dx in range(PADDING) for y in prompt_rows} == {
            (255, 255, 255)
        }
