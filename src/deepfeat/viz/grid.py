"""The picture of a search: query and top-k results in a grid, labelled and coloured."""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

COLORS = {"relevant": (40, 170, 60), "irrelevant": (210, 40, 40), "junk": (150, 150, 150), None: (255, 255, 255)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _thumb(path: str | os.PathLike, size: int, bbox: Sequence[float] | None = None) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            if bbox:
                im = im.crop(tuple(int(round(v)) for v in bbox))
            im.thumbnail((size, size), Image.Resampling.BICUBIC)
            canvas = Image.new("RGB", (size, size), (245, 245, 245))
            canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
            return canvas
    except Exception:
        canvas = Image.new("RGB", (size, size), (230, 230, 230))
        ImageDraw.Draw(canvas).text((8, size // 2), "unreadable", fill=(120, 0, 0), font=_font(14))
        return canvas


def search_grid(query: str | os.PathLike | None, query_label: str, hits: Sequence, out: str | os.PathLike,
                verdicts: Sequence[str | None] | None = None, cols: int = 6, thumb: int = 160,
                query_bbox: Sequence[float] | None = None) -> str:
    """Draw the query (left) and its hits (rank, score, file name), each framed green/red/grey
    when *verdicts* ('relevant'/'irrelevant'/'junk') are given; write a PNG; return its path."""
    pad, border, text_h = 8, 5, 34
    n = len(hits)
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, -(-n // cols))
    cell_w, cell_h = thumb + 2 * border + pad, thumb + 2 * border + text_h + pad
    width = pad + cell_w * (cols + 1) + pad
    height = pad + 24 + cell_h * rows + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    draw.text((pad, pad), f"query: {query_label}"[:160], fill=(0, 0, 0), font=font)
    y0 = pad + 24

    def cell(x: int, y: int, im: Image.Image, color, line1: str, line2: str) -> None:
        draw.rectangle([x, y, x + thumb + 2 * border - 1, y + thumb + 2 * border - 1], fill=color)
        img.paste(im, (x + border, y + border))
        draw.text((x, y + thumb + 2 * border + 2), line1, fill=(0, 0, 0), font=small)
        draw.text((x, y + thumb + 2 * border + 16), line2[:26], fill=(60, 60, 60), font=small)

    if query is not None:
        cell(pad, y0, _thumb(query, thumb, query_bbox), (40, 90, 200), "query", os.path.basename(str(query)))
    for i, h in enumerate(hits):
        r, c = divmod(i, cols)
        v = verdicts[i] if verdicts else None
        cell(pad + cell_w * (c + 1), y0 + cell_h * r, _thumb(h.path, thumb), COLORS.get(v, COLORS[None]),
             f"#{h.rank}  {h.score:.3f}" + (f"  {v}" if v else ""), os.path.basename(h.path))
    img.save(out)
    return str(out)
