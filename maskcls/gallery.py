"""Contact sheets: rows of captioned thumbnails in one PNG, for people to look at.

Two pictures use it: the error gallery (`errors.png`: per true class, the model's most confident
mistakes; written by train.py for the best-F1 epoch and by `evaluation.py --images`) and the label
audit's `audit.png` (one row per suspect with their photos; audit.py).

The thumbnails are pasted into one uint8 canvas and the captions drawn on it with PIL in matplotlib's
font (DejaVu Sans, as in metrics.py's plots): a sheet of ~100 photos takes a fraction of a second,
where one matplotlib text artist per caption took seconds. JPEGs are decoded at a reduced size
(libjpeg scaled decoding); a missing or unreadable file becomes a grey cell saying so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskcls.fileio import atomic_write
from maskcls.imaging import jpeg_reduction, load_image
from maskcls.task import class_names
# Imported where used, being heavy or optional: matplotlib's fonts (only to draw text).

THUMB = (96, 72)  # (H, W) of a photo in a sheet: faces stay recognisable, 100 photos stay cheap
CELL_W = 150  # pixels per cell: room for a caption of about 28 characters at the caption font size
CAPTION_H = 36  # up to three caption lines under each photo
TITLE_H = 16  # the row title above each row
HIGHLIGHT = (220, 30, 30)
CAPTION_PX, TITLE_PX = 9, 10  # font sizes in pixels
MAX_PER_CLASS = 4


@dataclass
class Cell:
    """One photo with up to three caption lines; `highlight` frames it in red."""

    path: str | os.PathLike | None
    caption: str = ""
    highlight: bool = False
    image: np.ndarray | None = None  # the pixels to show instead of the file (e.g. the face crop a model saw)


@dataclass
class SheetRow:
    title: str
    cells: list[Cell] = field(default_factory=list)


def thumbnail(path: str | os.PathLike | None, size: tuple[int, int] = THUMB) -> np.ndarray | None:
    """RGB uint8 [H, W, 3] letterboxed into `size`, or None when the file cannot be read."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        img = load_image(path, jpeg_reduction(path, size))
    except Exception:  # a bad image in a picture for people must not stop training or an audit
        return None
    return letterbox(img, size)


def letterbox(img: np.ndarray, size: tuple[int, int] = THUMB) -> np.ndarray:
    """RGB uint8 `img` shrunk to fit `size` (H, W), centred on white."""
    h, w = img.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.full((*size, 3), 255, np.uint8)
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def _font(size: int, bold: bool = False):
    """DejaVu Sans, the font matplotlib ships (so metrics.py's plots and these sheets match), else PIL's own."""
    try:
        from matplotlib import font_manager

        family = font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
        return ImageFont.truetype(font_manager.findfont(family), size)
    except Exception:  # no matplotlib font file: PIL's built-in font still draws every caption
        return ImageFont.load_default()


def render(rows: Sequence[SheetRow], title: str = "", thumb: tuple[int, int] = THUMB) -> np.ndarray:
    """The sheet's pixels [H, W, 3] uint8: per row a bold title line, then the photos with their captions."""
    columns = max([len(r.cells) for r in rows] + [1])
    width = max(columns * CELL_W, 480)
    header = TITLE_H + 8 if title else 0
    row_h = TITLE_H + thumb[0] + CAPTION_H
    height = header + max(1, len(rows)) * row_h + 4
    canvas = np.full((height, width, 3), 255, np.uint8)
    texts: list[tuple[float, float, str, str, tuple[int, int, int], bool]] = []  # x, y, text, anchor, colour, bold
    if title:
        texts.append((width / 2, 4, title, "ma", (0, 0, 0), True))
    if not rows:
        texts.append((width / 2, header + row_h / 2, "nothing to show", "ma", (0, 0, 0), False))
    for r, row in enumerate(rows):
        y0 = header + r * row_h
        texts.append((4, y0 + 2, row.title, "la", (0, 0, 0), True))
        for c, cell in enumerate(row.cells):
            x, y = c * CELL_W + (CELL_W - thumb[1]) // 2, y0 + TITLE_H
            img = letterbox(cell.image, thumb) if cell.image is not None else thumbnail(cell.path, thumb)
            if img is None:
                canvas[y:y + thumb[0], x:x + thumb[1]] = 200
                texts.append((x + thumb[1] / 2, y + thumb[0] / 2, "missing", "mm", (0, 0, 0), False))
            else:
                canvas[y:y + thumb[0], x:x + thumb[1]] = img
            if cell.highlight:
                _frame(canvas, y, x, thumb)
            colour = (150, 0, 0) if cell.highlight else (0, 0, 0)
            for k, line in enumerate(cell.caption.splitlines()[:3]):
                texts.append((c * CELL_W + CELL_W / 2, y + thumb[0] + 2 + k * 11, line, "ma", colour, False))
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    regular, bold = _font(CAPTION_PX), _font(TITLE_PX, bold=True)
    for x, y, text, anchor, colour, strong in texts:
        draw.text((x, y), text, fill=colour, font=bold if strong else regular, anchor=anchor)
    return np.asarray(image)


def _frame(canvas: np.ndarray, y: int, x: int, thumb: tuple[int, int], width: int = 3) -> None:
    h, w = thumb
    y0, x0 = max(0, y - width), max(0, x - width)
    canvas[y0:y, x0:x + w + width] = HIGHLIGHT
    canvas[y + h:y + h + width, x0:x + w + width] = HIGHLIGHT
    canvas[y0:y + h + width, x0:x] = HIGHLIGHT
    canvas[y0:y + h + width, x + w:x + w + width] = HIGHLIGHT


def save_sheet(path: str | os.PathLike, rows: Sequence[SheetRow], title: str = "",
               thumb: tuple[int, int] = THUMB) -> np.ndarray:
    """Draw the sheet and write it as a PNG atomically; returns its pixels [H, W, 3] (for TensorBoard)."""
    pixels = render(rows, title, thumb)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    return pixels


# --------------------------------------------------------------------------- the error gallery
def error_rows(paths: Sequence[str], truth: np.ndarray, pred: np.ndarray, probs: np.ndarray, names: Sequence[str],
               per_class: int = MAX_PER_CLASS, people: Sequence[str] | None = None,
               image_of: Callable[[int], np.ndarray] | None = None) -> list[SheetRow]:
    """Per true class (in class order), its `per_class` most confident mistakes: the predicted class's
    probability, highest first. `people` (optional): each image's person, a third caption line; a row
    then shows one photo per person, so a mislabeled person does not fill it alone. `image_of(i)`
    (optional): the pixels the model saw for image i (a face stage's crop), shown instead of the file."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    confidence = np.asarray(probs)[np.arange(len(pred)), pred]
    rows = []
    for c, name in enumerate(names):
        wrong = np.flatnonzero((truth == c) & (pred != c))
        if not len(wrong):
            continue
        top, seen = [], set()
        for i in wrong[np.argsort(-confidence[wrong], kind="stable")]:
            if people is None or people[i] not in seen:
                top.append(i)
                seen.add(people[i] if people is not None else i)
            if len(top) == per_class:
                break
        total = int((truth == c).sum())
        cells = [Cell(paths[i], f"-> {names[pred[i]]}\np {confidence[i]:.2f}"
                      + (f"\n{people[i]}" if people is not None else ""),
                      image=image_of(i) if image_of is not None else None) for i in top]
        rows.append(SheetRow(f"true {name}: {len(wrong)} of {total} wrong", cells))
    return rows


def save_error_gallery(path: str | os.PathLike, paths: Sequence[str], truth: np.ndarray, pred: np.ndarray,
                       probs: np.ndarray, task: str, age_bins: Sequence[int], title: str = "",
                       people: Sequence[str] | None = None, per_class: int = MAX_PER_CLASS,
                       image_of: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """errors.png: for each class, its most confident mistakes (photo or `image_of(i)`, predicted class,
    probability)."""
    names = class_names(task, age_bins)
    rows = error_rows(paths, truth, pred, probs, names, per_class, people, image_of)
    n_wrong = int((np.asarray(truth) != np.asarray(pred)).sum())
    head = f"{title + ': ' if title else ''}most confident mistakes per true class ({n_wrong} of {len(truth)} wrong)"
    return save_sheet(path, rows, head)
