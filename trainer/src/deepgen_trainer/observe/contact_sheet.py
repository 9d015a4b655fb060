"""Contact sheets: a grid PNG of the evaluation images of a fixed prompt subset, with the judge's verdicts.

Each cell shows one image (duplicate 0 of one of the first `SHEET_PROMPTS` benchmark prompts), the
prompt (wrapped, at most `PROMPT_LINES` lines) and one line per testpoint: a green square for a
satisfied testpoint, a red one for a failed one, then its name. An image without a usable verdict (parse
failure, error, never judged) says so in grey. The subset is the same at every step and for every
checkpoint, so sheets compare side by side.

Text is wrapped and cut to the cell's width in pixels. The font is the CJK font of `cjk_font.py` (Noto
Sans CJK SC, a dependency of the trainer), else Pillow's built-in font after one warning: Chinese
prompts and testpoint names then show as boxes, the coloured squares still carry the verdicts.
`font_path` picks a font explicitly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from deepgen_common.types import ImageResult
from deepgen_trainer.observe.cjk_font import cjk_font

SHEET_PROMPTS = 8
SHEET_COLUMNS = 4
CELL_SIDE = 256
PROMPT_LINES = 3
TESTPOINT_LINES = 8
LINE_HEIGHT = 14
FONT_SIZE = 11
PADDING = 4
_OK, _WRONG, _NONE = (46, 160, 67), (207, 34, 46), (140, 140, 140)


@dataclass(frozen=True)
class SheetEntry:
    """One cell: the encoded image (None when it was not generated), its prompt and its verdicts
    (None when it was never judged)."""

    prompt_id: str
    prompt: str
    image: bytes | None
    verdict: ImageResult | None


def sheet_prompt_ids(prompt_ids: Sequence[str], count: int = SHEET_PROMPTS) -> list[str]:
    """The fixed subset: the first `count` prompts in benchmark order (their duplicate 0 is shown)."""
    return list(prompt_ids[:count])


def cell_size(cell_side: int = CELL_SIDE) -> tuple[int, int]:
    """(width, height) of one cell: the image, then the prompt and testpoint lines."""
    text_lines = PROMPT_LINES + TESTPOINT_LINES
    return cell_side, cell_side + PADDING * 2 + text_lines * LINE_HEIGHT


def sheet_size(entries: int, columns: int = SHEET_COLUMNS, cell_side: int = CELL_SIDE) -> tuple[int, int]:
    """(width, height) of the sheet of `entries` cells, `columns` (at most) per row."""
    if entries < 1 or columns < 1:
        raise ValueError(f"a contact sheet needs >= 1 entry and >= 1 column, got {entries} and {columns}")
    width, height = cell_size(cell_side)
    used = min(columns, entries)
    rows = -(-entries // used)
    return used * width, rows * height


def render_contact_sheet(
    entries: Sequence[SheetEntry],
    columns: int = SHEET_COLUMNS,
    cell_side: int = CELL_SIDE,
    font_path: str | Path | None = None,
) -> Image.Image:
    """The RGB sheet of `entries`, row by row, of size `sheet_size(len(entries), columns, cell_side)`."""
    sheet = Image.new("RGB", sheet_size(len(entries), columns, cell_side), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.truetype(str(font_path), FONT_SIZE) if font_path else cjk_font(FONT_SIZE)
    width, height = cell_size(cell_side)
    used = min(columns, len(entries))
    for n, entry in enumerate(entries):
        x, y = (n % used) * width, (n // used) * height
        _draw_cell(sheet, draw, font, entry, x, y, cell_side)
    return sheet


def save_contact_sheet(path: str | Path, entries: Sequence[SheetEntry], font_path: str | Path | None = None) -> Path:
    """Render `entries` and write the PNG to `path` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_contact_sheet(entries, font_path=font_path).save(path, format="PNG")
    return path


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    entry: SheetEntry,
    x: int,
    y: int,
    side: int,
) -> None:
    if entry.image is None:
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=(230, 230, 230))
        draw.text((x + PADDING, y + side // 2), "not generated", fill=_NONE, font=font)
    else:
        with Image.open(io.BytesIO(entry.image)) as image:
            sheet.paste(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), (x, y))
    line_y = y + side + PADDING
    text_width = side - 2 * PADDING
    prompt_lines = _wrap(f"{entry.prompt_id}: {entry.prompt}", font, text_width)
    if len(prompt_lines) > PROMPT_LINES:
        prompt_lines = [
            *prompt_lines[: PROMPT_LINES - 1],
            _cut(prompt_lines[PROMPT_LINES - 1] + "...", font, text_width),
        ]
    for line in prompt_lines:
        draw.text((x + PADDING, line_y), line, fill="black", font=font)
        line_y += LINE_HEIGHT
    line_y = y + side + PADDING + PROMPT_LINES * LINE_HEIGHT
    verdict = entry.verdict
    if verdict is None or verdict.status != "ok" or verdict.scores is None:
        status = "not judged" if verdict is None else f"{verdict.status.replace('_', ' ')}: {verdict.detail}"
        draw.text((x + PADDING, line_y), _cut(status, font, text_width), fill=_NONE, font=font)
        return
    pairs = list(zip(verdict.testpoints, verdict.scores, strict=True))
    shown = pairs if len(pairs) <= TESTPOINT_LINES else pairs[: TESTPOINT_LINES - 1]
    for name, score in shown:
        mark = LINE_HEIGHT - 5
        draw.rectangle([x + PADDING, line_y + 2, x + PADDING + mark, line_y + 2 + mark], fill=_OK if score else _WRONG)
        draw.text((x + PADDING + mark + 4, line_y), _cut(name, font, text_width - mark - 4), fill="black", font=font)
        line_y += LINE_HEIGHT
    if len(shown) < len(pairs):
        rest = pairs[len(shown) :]
        more = f"+{len(rest)} more: {sum(s for _, s in rest)}/{len(rest)} satisfied"
        draw.text((x + PADDING, line_y), more, fill=_NONE, font=font)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy lines of at most `width` pixels, broken at the last space when the line has one (Latin),
    else between characters (CJK has no spaces)."""
    lines: list[str] = []
    line = ""
    for char in text:
        if font.getlength(line + char) <= width:
            line += char
            continue
        cut = line.rfind(" ")
        if cut > 0 and char != " ":
            lines.append(line[:cut])
            line = line[cut + 1 :] + char
        else:
            lines.append(line)
            line = "" if char == " " else char
    return [*lines, line] if line or not lines else lines


def _cut(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, shortened with "..." to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."
