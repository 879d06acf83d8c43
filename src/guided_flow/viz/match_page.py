"""The interactive page of one matched pair (``guided-flow match``): hover a source point to see
its match, with the confident matches and keypoints drawn over both pictures."""

from __future__ import annotations

import base64
import os

import numpy as np

from guided_flow.io.resample import shrink_image
from guided_flow.viz.html import (
    box,
    check_rgb,
    data_uri,
    fitted_size,
    img,
    page,
    script,
    write_text,
)

DISPLAY_SIZE = 480
"""Longest side, in CSS pixels, of each picture on the match page."""
EMBEDDED_SIZE = 2 * DISPLAY_SIZE
"""Longest side, in pixels, of the pictures embedded in the page (larger ones are shrunk: sharp
on high-density screens, and a page of a few hundred kilobytes whatever the pictures' size)."""

_MATCH_CSS = """
#controls{margin-bottom:8px}#controls label{margin-right:16px}
#pair{position:relative;display:flex;gap:24px;align-items:flex-start}
#source-box{cursor:crosshair}
.marker{position:absolute;width:14px;height:14px;margin:-9px 0 0 -9px;border:2px solid #fff;
border-radius:50%;outline:2px solid #000;pointer-events:none}
#match-lines line{stroke-width:1;opacity:.8}
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
    original target pixels like :meth:`GuidedSemanticFlow.match` maps keypoints. Pictures
    larger than :data:`EMBEDDED_SIZE` are embedded shrunk; every position stays in original
    pixels."""
    check_rgb("source_rgb", source_rgb)
    check_rgb("target_rgb", target_rgb)
    check_rgb("flow_rgb", flow_rgb, source_rgb.shape[:2])
    check_rgb("warped_rgb", warped_rgb, target_rgb.shape[:2])
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
    embedded = [
        shrink_image(picture, EMBEDDED_SIZE)
        for picture in (source_rgb, flow_rgb, target_rgb, warped_rgb)
    ]
    source = img("source-img", data_uri(embedded[0], "JPEG"), show_s) + img(
        "flow-img", data_uri(embedded[1], "PNG"), show_s, "hidden"
    )
    target = img("target-img", data_uri(embedded[2], "JPEG"), show_t) + img(
        "warped-img", data_uri(embedded[3], "JPEG"), show_t, 'style="opacity:0"'
    )
    no_kps = "" if len(kps[0]) else " disabled"
    body = (
        '<h1>guided-flow match</h1><div id="controls">'
        f'<label><input type="checkbox" id="toggle-matches"> confident matches ({len(matches)})'
        '</label><label><input type="checkbox" id="toggle-flow"> flow colours</label>'
        f'<label><input type="checkbox" id="toggle-keypoints"{no_kps}> keypoints ({len(kps[0])})'
        '</label><label>warped source <input type="range" id="blend" min="0" max="100" '
        'value="0"></label><span id="readout">move over the source</span></div>'
        f'<div id="pair">{box("source", show_s, source)}{box("target", show_t, target)}'
        '<svg class="overlay" id="match-lines"></svg></div>' + script(_MATCH_JS, {"D": data})
    )
    write_text(path, page("guided-flow match", _MATCH_CSS, body))
