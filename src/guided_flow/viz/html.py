"""Shared pieces of the project's self-contained HTML pages (:mod:`guided_flow.viz.match_page`,
:mod:`guided_flow.viz.results_page`): styles, SVG helpers, inline data and atomic writing.

The pages load nothing from the network: images and data are inline (data URIs, inline scripts)
or sit next to the page (``pairs.js``, thumbnails), so they open from ``file://``. Points are
(x, y) pixels with centres at integers; an image shown at ``k`` display pixels per pixel draws
the point x at ``(x + 0.5) * k``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image

from guided_flow.io.atomic import atomic_open

BASE_CSS = """
body{font:14px sans-serif;margin:16px;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.box{position:relative;display:inline-block;flex:none}
.box img,.overlay{position:absolute;left:0;top:0}.overlay{pointer-events:none}
"""


SVG_JS = """
const $ = (id) => document.getElementById(id);
const SVG_NS = (() => {
  const holder = document.createElement('div');
  holder.innerHTML = '<svg></svg>';
  return holder.firstChild.namespaceURI;
})();
function svg(name, attrs) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}
"""


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text.encode("utf-8"))


def script_json(value: object) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` (no ``</script>``, no
    ``<!--``, no line separators)."""
    text = json.dumps(value, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def script(body: str, constants: Mapping[str, object]) -> str:
    """An inline ``<script>`` running ``body`` in its own scope after the SVG helpers, with
    ``constants`` declared as JSON values."""
    declared = "".join(f"const {name} = {script_json(v)};\n" for name, v in constants.items())
    return f"<script>(() => {{\n{declared}{SVG_JS}{body}}})();</script>"


def data_uri(image: np.ndarray, fmt: str) -> str:
    """``H x W x 3`` uint8 -> a ``data:image/...;base64`` URI of a PNG or JPEG (quality 90)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def check_rgb(name: str, image: np.ndarray, size: tuple[int, int] | None = None) -> None:
    """Raise ``ValueError`` unless ``image`` is ``H x W x 3`` uint8 (of ``size = (H, W)``)."""
    shape = getattr(image, "shape", None)
    if getattr(image, "dtype", None) != np.uint8 or shape is None or shape[2:] != (3,):
        raise ValueError(f"{name} must be an H x W x 3 uint8 array, got {shape}")
    if size is not None and shape[:2] != tuple(size):
        raise ValueError(f"{name} must be {size[0]} x {size[1]} x 3, got {shape}")


def fitted_size(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """(H, W) scaled, keeping the aspect, so that the longest side is ``limit`` pixels."""
    scale = limit / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def box(name: str, size: tuple[int, int], images: str) -> str:
    """A positioned container ``{name}-box`` of a picture at display ``size = (H, W)`` with its
    images, a keypoint layer ``{name}-kps`` and a marker ``{name}-marker``."""
    h, w = size
    return (
        f'<div class="box" id="{name}-box" style="width:{w}px;height:{h}px">{images}'
        f'<svg class="overlay" id="{name}-kps" width="{w}" height="{h}"></svg>'
        f'<div class="marker" id="{name}-marker" hidden></div></div>'
    )


def img(image_id: str, uri: str, size: tuple[int, int], extra: str = "") -> str:
    """An ``<img>`` shown at ``size = (H, W)`` display pixels."""
    return f'<img id="{image_id}" src="{uri}" width="{size[1]}" height="{size[0]}" alt="" {extra}>'


def page(title: str, css: str, body: str) -> str:
    """A complete HTML document."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{BASE_CSS}{css}</style></head>\n"
        f"<body>{body}</body></html>\n"
    )
