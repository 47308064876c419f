// The dashboard's loss chart, drawn as inline SVG at the pixel width of its container (so it is never cut
// and its labels keep their size at any window width), and each job's colour, which never changes.
(function () {
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
// 12 colours that stay apart; a job keeps the one it was given (remembered in localStorage), a new job gets
// one no listed job uses while there is one
const PALETTE = ["#1f77b4", "#e4572e", "#2ca02c", "#9467bd", "#d4a017", "#17becf", "#d6336c", "#8c564b",
  "#4c6ef5", "#5c940d", "#f08c00", "#495057"];
const COLOR_KEY = "lorafleet-colors";
const MAX_REMEMBERED = 500;

function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

const colors = {
  map: null,
  load() {
    if (this.map) return;
    try { this.map = JSON.parse(localStorage.getItem(COLOR_KEY) || "{}"); } catch (e) { this.map = {}; }
    if (typeof this.map !== "object" || this.map === null) this.map = {};
  },
  // Give every job of `jobs` (oldest first gets the first free colour) a palette index, keeping old ones.
  assign(jobs) {
    this.load();
    const fresh = [...jobs].filter((j) => !(j.id in this.map)).sort((a, b) => a.created_at - b.created_at);
    if (fresh.length === 0) return;
    const used = new Map(PALETTE.map((_, i) => [i, 0]));
    for (const j of jobs) if (j.id in this.map) used.set(this.map[j.id], (used.get(this.map[j.id]) || 0) + 1);
    for (const j of fresh) {
      let best = 0;
      for (const [i, n] of used) if (n < used.get(best)) best = i;
      this.map[j.id] = best;
      used.set(best, used.get(best) + 1);
    }
    const ids = Object.keys(this.map);
    for (const id of ids.slice(0, Math.max(0, ids.length - MAX_REMEMBERED))) delete this.map[id];
    try { localStorage.setItem(COLOR_KEY, JSON.stringify(this.map)); } catch (e) { /* private mode: this page only */ }
  },
  of(jobId) {
    this.load();
    return PALETTE[(this.map[jobId] ?? 0) % PALETTE.length];
  },
};

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step = Math.pow(10, Math.floor(Math.log10(span / n)));
  const mult = [1, 2, 5, 10].find((m) => span / (m * step) <= n) || 10;
  const d = mult * step;
  const out = [];
  for (let v = Math.ceil(lo / d) * d; v <= hi + 1e-12; v += d) out.push(+v.toPrecision(12));
  return out;
}

// Draw `lines` ([{id, label, color, train: [[step, loss]...], valid: [[step, loss]...]}]) into `chart`:
// training loss solid, validation loss dashed with a dot per evaluation, in the job's colour.
function drawChart(chart, lines) {
  const box = chart.parentElement.getBoundingClientRect();
  const cs = getComputedStyle(chart.parentElement);
  const inner = box.width - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const W = Math.max(240, Math.floor(inner)), H = W < 560 ? 220 : 300;
  const L = 48, R = 12, T = 10, B = 34;
  chart.setAttribute("width", W);
  chart.setAttribute("height", H);
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  chart.replaceChildren();
  const shown = lines.filter((l) => l.train.length || l.valid.length);
  if (shown.length === 0) {
    chart.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no training steps yet"));
    return;
  }
  const all = shown.flatMap((l) => [...l.train, ...l.valid]);
  const xMax = Math.max(1, ...all.map((p) => p[0]));
  let yMin = Math.min(...all.map((p) => p[1])), yMax = Math.max(...all.map((p) => p[1]));
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  const pad = 0.05 * (yMax - yMin); yMin -= pad; yMax += pad;
  const x = (v) => L + (v / xMax) * (W - L - R);
  const y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);
  for (const t of niceTicks(yMin, yMax, 5)) {
    chart.appendChild(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: y(t), y2: y(t) }));
    chart.appendChild(svgEl("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, String(t)));
  }
  for (const t of niceTicks(0, xMax, Math.max(2, Math.floor((W - L - R) / 70)))) {
    if (t === Math.floor(t)) chart.appendChild(svgEl("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, String(t)));
  }
  chart.appendChild(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  chart.appendChild(svgEl("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  chart.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "optimizer step"));
  const mid = T + (H - T - B) / 2;
  chart.appendChild(svgEl("text", { x: 12, y: mid, transform: `rotate(-90 12 ${mid})`, "text-anchor": "middle" }, "loss"));
  const pts = (ps) => ps.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
  for (const l of shown) {
    if (l.train.length) {
      chart.appendChild(svgEl("polyline", { class: "curve train", "data-job": l.id, "data-points": l.train.length, points: pts(l.train), stroke: l.color }));
      if (l.train.length === 1) chart.appendChild(svgEl("circle", { cx: x(l.train[0][0]), cy: y(l.train[0][1]), r: 3, fill: l.color }));
    }
    if (l.valid.length) {
      chart.appendChild(svgEl("polyline", { class: "curve valid", "data-job": l.id, "data-points": l.valid.length, points: pts(l.valid), stroke: l.color }));
      for (const p of l.valid) chart.appendChild(svgEl("circle", { class: "valid-dot", cx: x(p[0]), cy: y(p[1]), r: 3, fill: "#fff", stroke: l.color }));
    }
  }
}

window.lfChart = { colors, drawChart };
})();
