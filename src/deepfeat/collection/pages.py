"""Self-contained HTML gallery pages (clusters, outliers): thumbnails embedded as data: URIs, in
the colours and type of the search page (``serve/static/style.css``), so one file can be mailed,
opened offline or attached to a report."""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from deepfeat.errors import DeepfeatError

log = logging.getLogger(__name__)

THUMB = 160

STYLE = """
:root { --bg:#f6f7f9; --panel:#fff; --ink:#1d2430; --muted:#667085; --line:#dde1e7; --accent:#2f6fde;
  --bad:#b42318; --radius:10px; font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  color: var(--ink); background: var(--bg); }
* { box-sizing: border-box; } body { margin: 0; }
.top { padding: 0.8rem 1.5rem; background: var(--panel); border-bottom: 1px solid var(--line); }
.top h1 { margin: 0; font-size: 1.25rem; } .top h1 span { color: var(--accent); font-weight: 600; }
.top p { margin: 0.3rem 0 0; color: var(--muted); font-size: 0.85rem; }
main { padding: 1.25rem 1.5rem; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius);
  padding: 0.9rem 1rem; margin-bottom: 1rem; }
h2 { font-size: 1rem; margin: 0 0 0.6rem; } h2 span { color: var(--muted); font-weight: 400; font-size: 0.9rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 0.6rem; }
figure { margin: 0; } figure img { width: 100%; height: 130px; object-fit: cover; border-radius: 6px;
  background: var(--line); display: block; }
figcaption { font-size: 0.75rem; color: var(--muted); overflow-wrap: anywhere; margin-top: 0.2rem; }
figcaption b { color: var(--ink); font-variant-numeric: tabular-nums; }
.missing { display: flex; align-items: center; justify-content: center; height: 130px; color: var(--bad);
  font-size: 0.75rem; border: 1px dashed var(--line); border-radius: 6px; }
"""


@dataclass
class Tile:
    path: str
    caption: str = ""  # shown bold above the path (a score, a label)


@dataclass
class Group:
    title: str
    note: str = ""
    tiles: list[Tile] = field(default_factory=list)


def thumbnail_uri(path: str, size: int = THUMB) -> str | None:
    """A JPEG thumbnail of *path* as a data: URI, or None when the file cannot be read."""
    from PIL import Image, ImageOps

    from deepfeat.data.images import open_image

    try:
        img = open_image(path)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except (DeepfeatError, OSError) as e:
        log.warning("no thumbnail for %s: %s", path, e)
        return None


def _tile(t: Tile) -> str:
    uri = thumbnail_uri(t.path)
    esc = html.escape(t.path)
    pic = (f'<img src="{uri}" alt="{esc}" title="{esc}" loading="lazy">' if uri
           else '<div class="missing">cannot read</div>')
    cap = f"<b>{html.escape(t.caption)}</b> " if t.caption else ""
    return f"<figure>{pic}<figcaption>{cap}{html.escape(os.path.basename(t.path))}</figcaption></figure>"


def gallery_html(title: str, subtitle: str, groups: Sequence[Group]) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{STYLE}</style></head><body>",
             f"<header class=top><h1>deepfeat <span>{html.escape(title)}</span></h1>",
             f"<p>{html.escape(subtitle)}</p></header><main>"]
    for g in groups:
        note = f" <span>{html.escape(g.note)}</span>" if g.note else ""
        parts.append(f"<section><h2>{html.escape(g.title)}{note}</h2><div class=grid>")
        parts.extend(_tile(t) for t in g.tiles)
        parts.append("</div></section>")
    parts.append("</main></body></html>\n")
    return "".join(parts)


def write_gallery(path: str | os.PathLike, title: str, subtitle: str, groups: Sequence[Group]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(gallery_html(title, subtitle, groups))
