"""The browsable results page of an evaluation (``guided-flow test``): metrics, a sortable and
filterable per-pair table, and each pair's keypoints over thumbnails."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guided_flow.io.atomic import atomic_open
from guided_flow.viz.html import (
    check_rgb,
    fitted_size,
    page,
    script,
    script_json,
    write_text,
)

PAGE_SIZE = 100
"""Rows of the per-pair table built at a time on the results page."""

THUMB_DISPLAY = 320
"""Longest side, in CSS pixels, of each thumbnail in the results page's pair view."""

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
        check_rgb("source_rgb" if suffix == "s" else "target_rgb", image)
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
    record: dict[str, Any] = {
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
    write_text(Path(results_dir) / "pairs.js", f"window.GF_PAIRS = {script_json(records)};\n")
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
        + script(_RESULTS_JS, {"PAGE": PAGE_SIZE, "THUMB": THUMB_DISPLAY})
    )
    write_text(Path(results_dir) / "index.html", page("guided-flow test", _RESULTS_CSS, body))
