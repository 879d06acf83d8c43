"""Self-contained HTML pages: one interactive page per matched pair (``guided-flow match``) and a
browsable results page for an evaluation (``guided-flow test``).

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from guided_flow.io.flow_files import atomic_open

DISPLAY_SIZE = 480
"""Longest side, in CSS pixels, of each picture on the match page."""

PAGE_SIZE = 100
"""Rows of the per-pair table built at a time on the results page."""

THUMB_DISPLAY = 320
"""Longest side, in CSS pixels, of each thumbnail in the results page's pair view."""

_BASE_CSS = """
body{font:14px sans-serif;margin:16px;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}
.box{position:relative;display:inline-block;flex:none}
.box img,.overlay{position:absolute;left:0;top:0}.overlay{pointer-events:none}
"""

_MATCH_CSS = """
#controls{margin-bottom:8px}#controls label{margin-right:16px}
#pair{position:relative;display:flex;gap:24px;align-items:flex-start}
#source-box{cursor:crosshair}
.marker{position:absolute;width:14px;height:14px;margin:-9px 0 0 -9px;border:2px solid #fff;
border-radius:50%;outline:2px solid #000;pointer-events:none}
#match-lines line{stroke-width:1;opacity:.8}
"""

_SVG_JS = """
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

_MATCH_JS = """
  const bytes = Uint8Array.from(atob(D.flow), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const flow = new Float32Array(bytes.length / 4);
  for (let i = 0; i < flow.length; i++) flow[i] = view.getFloat32(4 * i, true);
  const [H, W] = D.inputSize, [hs, ws] = D.sourceSize, [ht, wt] = D.targetSize;
  const sx = W / ws, sy = H / hs, tx = W / wt, ty = H / ht;
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  function sample(cx, cy) {
    const x0 = Math.floor(cx), y0 = Math.floor(cy), a = cx - x0, b = cy - y0;
    let fx = 0, fy = 0;
    for (const [x, y, w] of [[x0, y0, (1 - a) * (1 - b)], [x0 + 1, y0, a * (1 - b)],
                             [x0, y0 + 1, (1 - a) * b], [x0 + 1, y0 + 1, a * b]]) {
      if (x < 0 || y < 0 || x >= W || y >= H) continue;
      fx += w * flow[y * W + x];
      fy += w * flow[H * W + y * W + x];
    }
    return [fx, fy];
  }
  function transfer(x, y) {
    const qx = (x + 0.5) * sx - 0.5, qy = (y + 0.5) * sy - 0.5;
    const [fx, fy] = sample(clamp(qx, 0, W - 1), clamp(qy, 0, H - 1));
    return [(qx + fx + 0.5) / tx - 0.5, (qy + fy + 0.5) / ty - 0.5];
  }
  const display = (box, [h, w], [x, y]) =>
    [(x + 0.5) * box.clientWidth / w, (y + 0.5) * box.clientHeight / h];
  function place(marker, [left, top]) {
    Object.assign(marker.style, {left: `${left}px`, top: `${top}px`});
    marker.hidden = false;
  }
  function point(event) {
    const box = $('source-box'), rect = box.getBoundingClientRect();
    const x = (event.clientX - rect.left) * ws / box.clientWidth - 0.5;
    const y = (event.clientY - rect.top) * hs / box.clientHeight - 0.5;
    const match = transfer(x, y);
    place($('source-marker'), display(box, D.sourceSize, [x, y]));
    place($('target-marker'), display($('target-box'), D.targetSize, match));
    $('readout').textContent = `(${x.toFixed(1)}, ${y.toFixed(1)}) -> ` +
      `(${match[0].toFixed(1)}, ${match[1].toFixed(1)})`;
  }
  function absolute(box, size, p) {
    const [x, y] = display(box, size, p);
    return [box.offsetLeft + x, box.offsetTop + y];
  }
  function drawLines() {
    const lines = $('match-lines'), pair = $('pair');
    lines.replaceChildren();
    lines.setAttribute('width', pair.scrollWidth);
    lines.setAttribute('height', pair.scrollHeight);
    if (!$('toggle-matches').checked) return;
    D.matches.forEach(([xs, ys, xt, yt], i) => {
      const [x1, y1] = absolute($('source-box'), D.sourceSize, [xs, ys]);
      const [x2, y2] = absolute($('target-box'), D.targetSize, [xt, yt]);
      const hue = (i * 137.5) % 360;
      lines.append(svg('line', {x1, y1, x2, y2, stroke: `hsl(${hue},90%,50%)`}));
    });
  }
  function drawKeypoints() {
    for (const [id, box, size, kps] of [['source-kps', 'source-box', D.sourceSize, D.sourceKps],
                                        ['target-kps', 'target-box', D.targetSize, D.targetKps]]) {
      const layer = $(id);
      layer.replaceChildren();
      if (!$('toggle-keypoints').checked) continue;
      kps.forEach((p, i) => {
        const [cx, cy] = display($(box), size, p);
        const fill = `hsl(${(i * 360) / kps.length},90%,50%)`;
        layer.append(svg('circle', {cx, cy, r: 5, fill, stroke: '#fff', 'stroke-width': 1.5}));
      });
    }
  }
  $('source-box').addEventListener('mousemove', point);
  $('source-box').addEventListener('click', point);
  $('toggle-matches').addEventListener('change', drawLines);
  $('toggle-keypoints').addEventListener('change', drawKeypoints);
  $('toggle-flow').addEventListener('change', (e) => { $('flow-img').hidden = !e.target.checked; });
  $('blend').addEventListener('input', (e) => {
    $('warped-img').style.opacity = e.target.value / 100;
  });
  window.addEventListener('resize', drawLines);
  window.guidedFlow = {transfer};
"""

_RESULTS_CSS = """
#controls{margin:12px 0}#controls label{margin-right:12px}
#pairs-table tbody tr{cursor:pointer}#pairs-table tbody tr:hover{background:#eef}
#sort-pck{cursor:pointer;text-decoration:underline dotted}
#pair-view{margin:12px 0}
#pair-view figure{display:inline-block;vertical-align:top;margin:0 16px 0 0}
#pair-view .hit,.src-hit{stroke:#1a1;fill:#1a1}#pair-view .miss,.src-miss{stroke:#d22;fill:#d22}
#pair-view .gt{fill:none;stroke-width:2}#pair-view line{stroke-width:1.5}
"""

_RESULTS_JS = """
  const PAIRS = window.GF_PAIRS;
  const filters = [...document.querySelectorAll('select.filter')];
  const state = {order: 0, page: 0, rows: []};
  const keep = (pair, f) => f.value === '' ||
    (f.dataset.flag ? String(pair.difficulty[f.dataset.flag]) : pair.category) === f.value;
  const percent = (v) => (100 * v).toFixed(2);
  function select() {
    const rows = PAIRS.map((_, i) => i).filter((i) => filters.every((f) => keep(PAIRS[i], f)));
    if (state.order) rows.sort((a, b) => state.order * (PAIRS[a].pck - PAIRS[b].pck) || a - b);
    state.rows = rows;
    state.page = 0;
    render();
  }
  function cell(row, text) { row.insertCell().textContent = text; }
  function render() {
    const pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
    const body = document.createDocumentFragment();
    for (const i of state.rows.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const pair = PAIRS[i], row = document.createElement('tr');
      row.className = 'pair-row';
      row.dataset.index = i;
      for (const text of [i, pair.pair_id, pair.category, percent(pair.pck),
                          `${pair.hits.filter(Boolean).length}/${pair.hits.length}`,
                          Object.entries(pair.difficulty).map((e) => e.join('=')).join(' ')])
        cell(row, text);
      body.append(row);
    }
    $('pair-rows').replaceChildren(body);
    $('page-info').textContent = `page ${state.page + 1} of ${pages}, ${state.rows.length} pairs`;
    $('prev-page').disabled = state.page === 0;
    $('next-page').disabled = state.page >= pages - 1;
  }
  function figure(src, [h, w], caption, draw) {
    const k = THUMB / Math.max(h, w), width = Math.round(w * k), height = Math.round(h * k);
    const fig = document.createElement('figure'), box = document.createElement('div');
    box.className = 'box';
    box.style.cssText = `width:${width}px;height:${height}px`;
    const img = document.createElement('img');
    Object.assign(img, {src, width, height, alt: caption});
    const layer = svg('svg', {class: 'overlay', width, height});
    const at = ([x, y]) => [(x + 0.5) * width / w, (y + 0.5) * height / h];
    draw(layer, at);
    box.append(img, layer);
    const text = document.createElement('figcaption');
    text.textContent = caption;
    fig.append(box, text);
    return fig;
  }
  function show(i) {
    const pair = PAIRS[i], kind = (j) => (pair.hits[j] ? 'hit' : 'miss');
    const source = figure(pair.source_thumb, pair.source_size, 'source keypoints', (layer, at) =>
      pair.src_kps.forEach((p, j) => {
        const [cx, cy] = at(p);
        layer.append(svg('circle', {cx, cy, r: 4, class: `src-${kind(j)}`}));
      }));
    const target = figure(pair.target_thumb, pair.target_size,
      'target: ground truth (rings), predictions (dots)', (layer, at) =>
      pair.trg_kps.forEach((p, j) => {
        const [gx, gy] = at(p), [px, py] = at(pair.pred_kps[j]), g = svg('g', {class: kind(j)});
        g.append(svg('line', {x1: px, y1: py, x2: gx, y2: gy}),
                 svg('circle', {cx: gx, cy: gy, r: 5, class: 'gt'}),
                 svg('circle', {cx: px, cy: py, r: 3, class: 'pred'}));
        layer.append(g);
      }));
    const title = document.createElement('h3');
    title.textContent = `${pair.pair_id} (${pair.category}): PCK ${percent(pair.pck)}, ` +
      `bound ${pair.bound.toFixed(1)} px; source dots: green hit, red miss`;
    $('pair-view').replaceChildren(title, source, target);
  }
  $('sort-pck').addEventListener('click', () => {
    state.order = state.order === 1 ? -1 : 1;
    $('sort-pck').textContent = state.order === 1 ? 'PCK \\u25b2' : 'PCK \\u25bc';
    select();
  });
  filters.forEach((f) => f.addEventListener('change', select));
  $('prev-page').addEventListener('click', () => { state.page--; render(); });
  $('next-page').addEventListener('click', () => { state.page++; render(); });
  $('pair-rows').addEventListener('click', (e) => {
    const row = e.target.closest('tr.pair-row');
    if (row) show(Number(row.dataset.index));
  });
  select();
"""


def _write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text.encode("utf-8"))


def _script_json(value: object) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` (no ``</script>``, no
    ``<!--``, no line separators)."""
    text = json.dumps(value, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def _script(body: str, constants: Mapping[str, object]) -> str:
    """An inline ``<script>`` running ``body`` in its own scope after the SVG helpers, with
    ``constants`` declared as JSON values."""
    declared = "".join(f"const {name} = {_script_json(v)};\n" for name, v in constants.items())
    return f"<script>(() => {{\n{declared}{_SVG_JS}{body}}})();</script>"


def _data_uri(image: np.ndarray, fmt: str) -> str:
    """``H x W x 3`` uint8 -> a ``data:image/...;base64`` URI of a PNG or JPEG (quality 90)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _check_rgb(name: str, image: np.ndarray, size: tuple[int, int] | None = None) -> None:
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


def _box(name: str, size: tuple[int, int], images: str) -> str:
    """A positioned container ``{name}-box`` of a picture at display ``size = (H, W)`` with its
    images, a keypoint layer ``{name}-kps`` and a marker ``{name}-marker``."""
    h, w = size
    return (
        f'<div class="box" id="{name}-box" style="width:{w}px;height:{h}px">{images}'
        f'<svg class="overlay" id="{name}-kps" width="{w}" height="{h}"></svg>'
        f'<div class="marker" id="{name}-marker" hidden></div></div>'
    )


def _img(image_id: str, uri: str, size: tuple[int, int], extra: str = "") -> str:
    """An ``<img>`` shown at ``size = (H, W)`` display pixels."""
    return f'<img id="{image_id}" src="{uri}" width="{size[1]}" height="{size[0]}" alt="" {extra}>'


def _page(title: str, css: str, body: str) -> str:
    """A complete HTML document."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_BASE_CSS}{css}</style></head>\n"
        f"<body>{body}</body></html>\n"
    )


def write_match_page(
    path: str | os.PathLike,
    source_rgb: np.ndarray,
    target_rgb: np.ndarray,
    flow_input: np.ndarray,
    confident_matches: tuple[np.ndarray, np.ndarray],
    flow_rgb: np.ndarray,
    warped_rgb: np.ndarray,
    source_kps: np.ndarray | None = None,
    target_kps: np.ndarray | None = None,
) -> None:
    """Write the interactive page of one matched pair to ``path`` (atomic).

    ``source_rgb`` ``H_s x W_s x 3`` and ``target_rgb`` ``H_t x W_t x 3`` uint8 are the original
    pictures; ``flow_input`` ``2 x H x W`` float32 is the network's source-to-target flow in
    input pixels (dx, dy) on its ``H x W`` input grid; ``confident_matches`` are ``N x 2``
    (x, y) original pixels of each picture; ``flow_rgb`` ``H_s x W_s x 3`` and ``warped_rgb``
    ``H_t x W_t x 3`` uint8 are the flow colours and the source warped onto the target;
    ``source_kps`` / ``target_kps`` ``K x 2`` are given and transferred keypoints (both or
    neither). The page's ``window.guidedFlow.transfer(x, y)`` maps original source pixels to
    original target pixels like :meth:`GuidedSemanticFlow.match` maps keypoints."""
    _check_rgb("source_rgb", source_rgb)
    _check_rgb("target_rgb", target_rgb)
    _check_rgb("flow_rgb", flow_rgb, source_rgb.shape[:2])
    _check_rgb("warped_rgb", warped_rgb, target_rgb.shape[:2])
    flow = np.asarray(flow_input)
    if flow.ndim != 3 or flow.shape[0] != 2 or 0 in flow.shape:
        raise ValueError(f"flow_input must be 2 x H x W, got {flow.shape}")
    if (source_kps is None) != (target_kps is None):
        raise ValueError("give both source_kps and target_kps, or neither")
    kps = [
        np.asarray(np.zeros((0, 2)) if k is None else k, np.float64)
        for k in (source_kps, target_kps)
    ]
    if kps[0].shape != kps[1].shape or kps[0].shape[1:] != (2,):
        raise ValueError(f"keypoints must be two K x 2 arrays, got {kps[0].shape, kps[1].shape}")
    matches = np.concatenate(
        [np.asarray(m, np.float64).reshape(-1, 2) for m in confident_matches], 1
    )
    data = {
        "flow": base64.b64encode(np.ascontiguousarray(flow, "<f4").tobytes()).decode("ascii"),
        "inputSize": list(flow.shape[1:]),
        "sourceSize": list(source_rgb.shape[:2]),
        "targetSize": list(target_rgb.shape[:2]),
        "matches": np.round(matches, 2).tolist(),
        "sourceKps": kps[0].tolist(),
        "targetKps": kps[1].tolist(),
    }
    show_s = fitted_size(source_rgb.shape[:2], DISPLAY_SIZE)
    show_t = fitted_size(target_rgb.shape[:2], DISPLAY_SIZE)
    source = _img("source-img", _data_uri(source_rgb, "JPEG"), show_s) + _img(
        "flow-img", _data_uri(flow_rgb, "PNG"), show_s, "hidden"
    )
    target = _img("target-img", _data_uri(target_rgb, "JPEG"), show_t) + _img(
        "warped-img", _data_uri(warped_rgb, "JPEG"), show_t, 'style="opacity:0"'
    )
    no_kps = "" if len(kps[0]) else " disabled"
    body = (
        '<h1>guided-flow match</h1><div id="controls">'
        f'<label><input type="checkbox" id="toggle-matches"> confident matches ({len(matches)})'
        '</label><label><input type="checkbox" id="toggle-flow"> flow colours</label>'
        f'<label><input type="checkbox" id="toggle-keypoints"{no_kps}> keypoints ({len(kps[0])})'
        '</label><label>warped source <input type="range" id="blend" min="0" max="100" '
        'value="0"></label><span id="readout">move over the source</span></div>'
        f'<div id="pair">{_box("source", show_s, source)}{_box("target", show_t, target)}'
        '<svg class="overlay" id="match-lines"></svg></div>' + _script(_MATCH_JS, {"D": data})
    )
    _write_text(path, _page("guided-flow match", _MATCH_CSS, body))


def write_pair_thumbnails(
    results_dir: str | os.PathLike,
    index: int,
    source_rgb: np.ndarray,
    target_rgb: np.ndarray,
    size: int = 160,
) -> tuple[str, str]:
    """Write ``thumbs/<index:06d>_s.jpg`` and ``_t.jpg`` under ``results_dir`` (atomic): the
    ``H x W x 3`` uint8 source and target, longest side ``size`` pixels. Returns the two paths
    relative to ``results_dir`` (``/``-separated)."""
    names = []
    for image, suffix in ((source_rgb, "s"), (target_rgb, "t")):
        _check_rgb("source_rgb" if suffix == "s" else "target_rgb", image)
        h, w = fitted_size(image.shape[:2], size)
        name = f"thumbs/{index:06d}_{suffix}.jpg"
        picture = Image.fromarray(image)
        if picture.size != (w, h):  # a caller may pass a thumbnail already
            picture = picture.resize((w, h), Image.Resampling.BILINEAR)
        with atomic_open(Path(results_dir) / name) as handle:
            picture.save(handle, "JPEG", quality=85)
        names.append(name)
    return names[0], names[1]


def _metrics_table(metrics: Mapping) -> str:
    """The ``metrics.json`` dict as an HTML table: overall, per category, then per value of each
    difficulty flag; PCK in percent."""
    keys = [key for key in metrics if key.startswith("pck@")]
    rows = [("overall", "all", metrics)]
    rows += [("category", name, row) for name, row in metrics.get("per_category", {}).items()]
    for flag, table in metrics.get("per_difficulty", {}).items():
        rows += [(flag, value, row) for value, row in table.items()]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["group", "name", "pairs", *keys])
    lines = [f'<table id="metrics"><thead><tr>{head}</tr></thead><tbody>']
    for group, name, row in rows:
        values = [f"{100 * row[k]:.2f}" if k in row else "-" for k in keys]
        cells = "".join(f"<td>{html.escape(str(v))}</td>" for v in [group, name, row["pairs"]])
        lines.append(f"<tr>{cells}{''.join(f'<td>{v}</td>' for v in values)}</tr>")
    return "".join(lines) + "</tbody></table>"


def _select(select_id: str, label: str, values: Sequence[str], flag: str = "") -> str:
    """A filter ``<select>`` with an empty "all" option and ``values``."""
    options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
    data = f' data-flag="{html.escape(flag)}"' if flag else ""
    return (
        f'<label>{html.escape(label)} <select class="filter" id="{html.escape(select_id)}"{data}>'
        f'<option value="">all</option>{options}</select></label>'
    )


def _filters(pairs: Sequence[Mapping], difficulty_names: Sequence[str]) -> str:
    """The category filter and one filter per difficulty flag (``difficulty_names`` first, then
    any other flag the pairs carry), each listing the values present."""
    flags = list(dict.fromkeys([*difficulty_names, *(f for p in pairs for f in p["difficulty"])]))
    selects = [_select("filter-category", "category", sorted({p["category"] for p in pairs}))]
    for flag in flags:
        values = sorted({int(p["difficulty"][flag]) for p in pairs if flag in p["difficulty"]})
        selects.append(_select(f"filter-{flag}", flag, [str(v) for v in values], flag))
    return "".join(selects)


def _pair_record(pair: Mapping) -> dict:
    """One pair for ``pairs.js`` in plain JSON types, keypoints rounded to 0.01 pixel."""
    record = {
        key: str(pair[key]) for key in ("pair_id", "category", "source_thumb", "target_thumb")
    }
    record.update(pck=float(pair["pck"]), bound=float(pair["bound"]))
    for key in ("src_kps", "pred_kps", "trg_kps"):
        record[key] = np.round(np.asarray(pair[key], np.float64).reshape(-1, 2), 2).tolist()
    record["hits"] = [bool(hit) for hit in pair["hits"]]
    for key in ("source_size", "target_size"):
        record[key] = [int(n) for n in pair[key]]
    record["difficulty"] = {str(flag): int(v) for flag, v in pair["difficulty"].items()}
    return record


def write_results_page(
    results_dir: str | os.PathLike,
    metrics: Mapping,
    pairs: Sequence[Mapping],
    alpha: float,
    difficulty_names: Sequence[str] = (),
) -> None:
    """Write ``results_dir/index.html`` and ``results_dir/pairs.js`` (atomic): the ``metrics``
    table (the ``metrics.json`` dict) and a sortable, filterable, paginated table of ``pairs``
    (dicts with ``pair_id``, ``category``, ``pck`` and ``hits`` at ``alpha``, ``bound``,
    ``src_kps`` / ``pred_kps`` / ``trg_kps`` ``K x 2`` original pixels, ``source_size`` /
    ``target_size`` (H, W), ``source_thumb`` / ``target_thumb`` paths relative to
    ``results_dir`` (see :func:`write_pair_thumbnails`) and ``difficulty`` {flag: int}); a
    clicked row shows its keypoints on the thumbnails."""
    records = [_pair_record(pair) for pair in pairs]
    _write_text(Path(results_dir) / "pairs.js", f"window.GF_PAIRS = {_script_json(records)};\n")
    head = "".join(
        f"<th>{h}</th>"
        for h in ["#", "pair", "category", '<span id="sort-pck">PCK</span>', "hits", "difficulty"]
    )
    body = (
        f"<h1>guided-flow test: PCK@{alpha:g}</h1>{_metrics_table(metrics)}"
        f'<div id="controls">{_filters(pairs, difficulty_names)}'
        '<button id="prev-page">previous</button><button id="next-page">next</button> '
        '<span id="page-info"></span></div><div id="pair-view"></div>'
        f'<table id="pairs-table"><thead><tr>{head}</tr></thead><tbody id="pair-rows"></tbody>'
        '</table><script src="pairs.js"></script>'
        + _script(_RESULTS_JS, {"PAGE": PAGE_SIZE, "THUMB": THUMB_DISPLAY})
    )
    _write_text(Path(results_dir) / "index.html", _page("guided-flow test", _RESULTS_CSS, body))
