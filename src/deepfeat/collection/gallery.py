"""Duplicate groups as pictures for review: a self-contained HTML page (thumbnails as data
URIs, nothing else to carry) and a PNG for notebooks, one row per group, the keeper first.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os

from PIL import Image, ImageDraw, ImageOps

from deepfeat.collection.duplicates import PAIR_KINDS, DuplicateReport

log = logging.getLogger(__name__)


def thumbnail(path: str, size: int) -> Image.Image:
    """The image at *path* fitted in size x size (EXIF orientation applied); grey if unreadable."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BICUBIC)
            return im
    except (OSError, ValueError) as e:
        log.warning("thumbnail of %s: %s", path, e)
        return Image.new("RGB", (size, size), (200, 200, 200))


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _how(report: DuplicateReport, group, row: int) -> str:
    """How a member joins its group: the strongest pair that names it."""
    if row == group.keeper:
        return "keep"
    x = min((p for p in group.pairs if row in (p.a, p.b)), key=lambda p: PAIR_KINDS.index(p.kind))
    parts = [x.kind]
    if x.score is not None:
        parts.append(f"cos {x.score:.3f}")
    if x.inliers is not None:
        parts.append(f"{x.inliers} inliers")
    return ", ".join(parts)


def _ordered(group) -> list[int]:
    return [group.keeper] + group.removable


_STYLE = """body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0 0 1em;padding:.5em}
.group h2{font-size:1em;margin:.2em 0 .5em}.members{display:flex;flex-wrap:wrap;gap:.6em}
figure{margin:0;width:%(s)dpx}figure img{max-width:%(s)dpx;max-height:%(s)dpx;display:block;border:3px solid #bbb}
figure.keep img{border-color:#2a7}figcaption{font-size:.75em;word-break:break-all}
.how{font-weight:600}.keep .how{color:#2a7}"""


def gallery_html(report: DuplicateReport, path: str | os.PathLike, size: int = 160) -> str:
    """Write the review page to *path*; returns it."""
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>duplicates of "
           f"{html.escape(report.store)}</title><style>{_STYLE % {'s': size}}</style></head><body>",
           f"<h1>{len(report.groups)} duplicate groups in {html.escape(report.store)}</h1>",
           f"<p>{report.stats.get('images', 0)} images, {report.stats.get('duplicates', 0)} duplicates; "
           f"the keeper (green) by the policy <code>{html.escape(report.settings.keep)}</code>.</p>"]
    for gi, g in enumerate(report.groups, 1):
        out.append(f'<section class=group id=group-{gi}><h2>group {gi}: {len(g.rows)} images</h2><div class=members>')
        for r in _ordered(g):
            f = report.files[r]
            cls = "keep" if r == g.keeper else "dup"
            out.append(f'<figure class={cls}><img alt="{html.escape(f.path)}" src="{_data_uri(thumbnail(f.file, size))}">'
                       f'<figcaption><span class=how>{html.escape(_how(report, g, r))}</span><br>'
                       f'{html.escape(f.path)}<br>{f.width}x{f.height}, {f.bytes} bytes</figcaption></figure>')
        out.append("</div></section>")
    out.append("</body></html>\n")
    text = "\n".join(out)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


def gallery_png(report: DuplicateReport, path: str | os.PathLike, size: int = 128, max_groups: int = 50) -> str:
    """A PNG of the first *max_groups* groups: a row each, the keeper first, a caption under each."""
    groups = report.groups[:max_groups]
    cols = max((len(g.rows) for g in groups), default=1)
    cell_w, cell_h, pad = size + 8, size + 30, 4
    canvas = Image.new("RGB", (cols * cell_w + pad, max(1, len(groups)) * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for gi, g in enumerate(groups):
        for ci, r in enumerate(_ordered(g)):
            x, y = pad + ci * cell_w, pad + gi * cell_h
            t = thumbnail(report.files[r].file, size)
            colour = (40, 170, 120) if r == g.keeper else (180, 180, 180)
            draw.rectangle((x - 2, y - 2, x + t.width + 1, y + t.height + 1), outline=colour, width=2)
            canvas.paste(t, (x, y))
            draw.text((x, y + size + 2), _how(report, g, r)[:24], fill=(0, 0, 0))
            draw.text((x, y + size + 14), os.path.basename(report.files[r].path)[:24], fill=(80, 80, 80))
    canvas.save(path)
    return str(path)
