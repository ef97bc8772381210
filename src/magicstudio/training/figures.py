"""Pictures that explain themselves: tiles with a title above and a caption below, mask outlines, and the
attention figure (each token's map over the image, captioned with its share on the face).

Text is drawn with Pillow's bundled scalable font (``ImageFont.load_default(size)``), so no font file is needed.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
OUTLINE = (255, 255, 255)


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_height(lines: list[str], f) -> int:
    return sum(f.getbbox(line or " ")[3] + 3 for line in lines)


def _wrap(text: str, f, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels (explicit newlines kept)."""
    avg = max(1.0, f.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    out = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, max(8, int(width / avg))) or [""]
    return out


def panel(tiles: list[Image.Image], title: str = "", caption: str = "", tile: int = 96, gap: int = 4,
          title_size: int = 14, caption_size: int = 12) -> Image.Image:
    """The ``tiles`` in a row (each resized to ``tile`` px, nearest: small pictures stay crisp), ``title`` above
    (bold ink) and ``caption`` below (wrapped to the row's width)."""
    width = len(tiles) * tile + (len(tiles) - 1) * gap
    ft, fc = font(title_size), font(caption_size)
    title_lines = _wrap(title, ft, width) if title else []
    caption_lines = _wrap(caption, fc, width) if caption else []
    top = _text_height(title_lines, ft) + (4 if title_lines else 0)
    bottom = _text_height(caption_lines, fc) + (4 if caption_lines else 0)
    canvas = Image.new("RGB", (width, top + tile + bottom), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for line in title_lines:
        draw.text((0, y), line, fill=INK, font=ft)
        y += ft.getbbox(line or " ")[3] + 3
    for i, im in enumerate(tiles):
        canvas.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (i * (tile + gap), top))
    y = top + tile + 4
    for line in caption_lines:
        draw.text((0, y), line, fill=MUTED, font=fc)
        y += fc.getbbox(line or " ")[3] + 3
    return canvas


def arrange(rows: list[list[Image.Image]], heading: str = "", margin: int = 12, gap: int = 16) -> Image.Image:
    """Panels in rows (each row's panels side by side, tops aligned) under an optional ``heading``."""
    fh = font(16)
    widths = [sum(p.width for p in row) + gap * (len(row) - 1) for row in rows]
    width = max(widths) + 2 * margin
    head_lines = _wrap(heading, fh, width - 2 * margin) if heading else []
    head = _text_height(head_lines, fh) + (8 if head_lines else 0)
    height = margin + head + sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1) + margin
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = margin
    for line in head_lines:
        draw.text((margin, y), line, fill=INK, font=fh)
        y += fh.getbbox(line or " ")[3] + 3
    y = margin + head
    for row in rows:
        x = margin
        for p in row:
            canvas.paste(p, (x, y))
            x += p.width + gap
        y += max(p.height for p in row) + gap
    return canvas


def outline(image: Image.Image, mask: np.ndarray, color=OUTLINE, width: int = 1) -> Image.Image:
    """``image`` with the boundary of ``mask`` (any size; nonzero = inside) drawn on top in ``color``."""
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    inside = np.asarray(m) > 0
    edge = np.zeros_like(inside)
    edge[1:, :] |= inside[1:, :] != inside[:-1, :]
    edge[:, 1:] |= inside[:, 1:] != inside[:, :-1]
    if width > 1:
        grown = edge.copy()
        for dy in range(-(width // 2), width // 2 + 1):
            for dx in range(-(width // 2), width // 2 + 1):
                grown |= np.roll(np.roll(edge, dy, 0), dx, 1)
        edge = grown
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[edge] = color
    return Image.fromarray(pixels)


def share_inside(heat, mask: np.ndarray) -> float:
    """The share of a (non-negative) attention map's mass inside ``mask`` (resized to the map, area-averaged)."""
    h = np.asarray(heat, dtype=np.float64)
    h = np.clip(h, 0, None)
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.float32)).resize(h.shape[::-1], Image.BOX)  # area mean
    m = np.asarray(m, dtype=np.float64)
    total = h.sum()
    return float((h * m).sum() / total) if total > 0 else float("nan")
