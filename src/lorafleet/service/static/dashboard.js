// The lorafleet dashboard: the tenant's jobs and their live training-loss curves, drawn as inline SVG.
// It calls the same REST API as every client, with the token kept in this browser's localStorage (or
// given once as /#token=...). Every value from the API is inserted as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const COLORS = ["#2f6fdf", "#d9822b", "#23914f", "#c8343b", "#7b4fd1", "#0f9bb0", "#b0407e", "#6b7a1f"];
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { token: null, jobs: [], series: new Map(), colors: new Map(), timer: null };

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + state.token } });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(msg);
  }
  return r;
}

function colorOf(jobId) {
  if (!state.colors.has(jobId)) state.colors.set(jobId, COLORS[state.colors.size % COLORS.length]);
  return state.colors.get(jobId);
}

async function fetchEvents(job) {
  // metrics events in ascending order from the last seen one; a step seen twice (a job resumed from a
  // checkpoint trains it again) keeps the newer loss
  let s = state.series.get(job.id);
  if (!s) { s = { after: null, loss: new Map(), complete: false }; state.series.set(job.id, s); }
  if (s.complete) return;  // a finished job's events were all read: no need to ask again
  const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
  for (;;) {
    let q = "?order=asc&limit=1000" + (s.after ? "&after=" + encodeURIComponent(s.after) : "");
    const page = await (await api("/v1/fine_tuning/jobs/" + job.id + "/events" + q)).json();
    for (const ev of page.data) {
      s.after = ev.id;
      if (ev.type === "metrics" && typeof ev.data.train_loss === "number") s.loss.set(ev.data.step, ev.data.train_loss);
    }
    if (!page.has_more) break;
  }
  s.complete = finished;
}

function fmtLoss(x) { return x === undefined ? "-" : x.toFixed(4); }

function lastLoss(jobId) {
  const s = state.series.get(jobId);
  if (!s || s.loss.size === 0) return undefined;
  return s.loss.get(Math.max(...s.loss.keys()));
}

async function download(job) {
  try {
    const r = await api("/v1/adapters/" + job.fine_tuned_model + "/download");
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: job.fine_tuned_model + ".zip" });
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { showMessage(e.message, true); }
}

async function cancel(job) {
  try {
    await fetch("/v1/fine_tuning/jobs/" + job.id + "/cancel", { method: "POST", headers: { Authorization: "Bearer " + state.token } });
    refresh();
  } catch (e) { showMessage(e.message, true); }
}

function renderTable() {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const job of state.jobs) {
    const tr = el("tr", { class: "job-row", "data-job": job.id, "data-status": job.status });
    const sw = el("td"); sw.appendChild(el("span", { class: "swatch", style: "background:" + colorOf(job.id) }));
    tr.appendChild(sw);
    tr.appendChild(el("td", {}, job.id + (job.user_provided_suffix ? " (" + job.user_provided_suffix + ")" : "")));
    const st = el("td"); st.appendChild(el("span", { class: "status " + job.status }, job.status)); tr.appendChild(st);
    tr.appendChild(el("td", { class: "num" }, job.lorafleet.step + " / " + (job.lorafleet.total_steps === null ? "?" : job.lorafleet.total_steps)));
    tr.appendChild(el("td", { class: "num" }, fmtLoss(lastLoss(job.id))));
    const ad = el("td");
    if (job.fine_tuned_model) {
      const b = el("button", { type: "button" }, "download " + job.fine_tuned_model);
      b.addEventListener("click", () => download(job)); ad.appendChild(b);
    } else if (job.error) {
      ad.appendChild(el("span", { class: "error", title: job.error.message }, job.error.message.slice(0, 60)));
    } else ad.appendChild(el("span", { class: "muted" }, "-"));
    tr.appendChild(ad);
    tr.appendChild(el("td", {}, new Date(job.created_at * 1000).toLocaleString()));
    const act = el("td");
    if (["validating_files", "queued", "running", "paused"].includes(job.status)) {
      const b = el("button", { type: "button" }, "cancel"); b.addEventListener("click", () => cancel(job)); act.appendChild(b);
    }
    tr.appendChild(act);
    body.appendChild(tr);
  }
}

function niceTicks(lo, hi, n) {
  const span = hi - lo || 1;
  const step = Math.pow(10, Math.floor(Math.log10(span / n)));
  const mult = [1, 2, 5, 10].find((m) => span / (m * step) <= n) || 10;
  const d = mult * step;
  const out = [];
  for (let v = Math.ceil(lo / d) * d; v <= hi + 1e-12; v += d) out.push(+v.toPrecision(12));
  return out;
}

function renderChart() {
  const chart = document.getElementById("chart");
  const W = 860, H = 320, L = 56, R = 16, T = 12, B = 36;
  chart.replaceChildren();
  const lines = [];
  for (const job of state.jobs) {
    const s = state.series.get(job.id);
    if (!s || s.loss.size === 0) continue;
    lines.push({ job, pts: [...s.loss.entries()].sort((a, b) => a[0] - b[0]) });
  }
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  if (lines.length === 0) {
    chart.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no training steps yet"));
    return;
  }
  const all = lines.flatMap((l) => l.pts);
  const xMax = Math.max(1, ...all.map((p) => p[0]));
  let yMin = Math.min(...all.map((p) => p[1])), yMax = Math.max(...all.map((p) => p[1]));
  if (yMax - yMin < 1e-9) { yMin -= 0.5; yMax += 0.5; }
  const pad = 0.05 * (yMax - yMin); yMin -= pad; yMax += pad;
  const x = (v) => L + (v / xMax) * (W - L - R);
  const y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);
  for (const t of niceTicks(yMin, yMax, 5)) {
    chart.appendChild(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(t), y2: y(t) }));
    chart.appendChild(svg("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end" }, String(t)));
  }
  for (const t of niceTicks(0, xMax, 8)) {
    chart.appendChild(svg("text", { x: x(t), y: H - B + 16, "text-anchor": "middle" }, String(t)));
  }
  chart.appendChild(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  chart.appendChild(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  chart.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "optimizer step"));
  chart.appendChild(svg("text", { x: 12, y: T + (H - T - B) / 2, transform: "rotate(-90 12 " + (T + (H - T - B) / 2) + ")", "text-anchor": "middle" }, "loss"));
  for (const { job, pts } of lines) {
    const color = colorOf(job.id);
    const points = pts.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    chart.appendChild(svg("polyline", { class: "curve", "data-job": job.id, "data-points": pts.length, points, stroke: color }));
    if (pts.length === 1) chart.appendChild(svg("circle", { cx: x(pts[0][0]), cy: y(pts[0][1]), r: 3, fill: color }));
    const item = el("span");
    item.appendChild(el("span", { class: "swatch", style: "background:" + color }));
    item.appendChild(document.createTextNode(" " + job.id + (job.user_provided_suffix ? " (" + job.user_provided_suffix + ")" : "")));
    legend.appendChild(item);
  }
}

function showMessage(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = isError ? "error" : "muted";
}

async function refresh() {
  if (!state.token) return;
  try {
    const page = await (await api("/v1/fine_tuning/jobs?limit=100")).json();
    state.jobs = page.data;
    await Promise.all(state.jobs.map(fetchEvents));
    renderTable();
    renderChart();
    showMessage(state.jobs.length + " job(s); updated " + new Date().toLocaleTimeString(), false);
    document.body.setAttribute("data-loaded", "1");
  } catch (e) {
    showMessage(e.message, true);
  }
  try {
    const h = await (await fetch("/healthz")).json();
    const workers = (h.workers || []).map((w) =>
      w.id + "@" + w.host + " " + w.base_model + " " + (w.alive ? w.state : "not alive") + ", " + w.active_jobs +
      " jobs, beat " + w.heartbeat_age_s.toFixed(1) + " s ago");
    document.getElementById("health").textContent =
      "model " + h.model + " | " + (workers.length ? "workers: " + workers.join("; ") : "no worker yet");
  } catch (e) { /* health is informational */ }
}

function start(token) {
  state.token = token;
  state.series.clear();
  localStorage.setItem("lorafleet-token", token);
  if (state.timer) clearInterval(state.timer);
  refresh();
  state.timer = setInterval(refresh, POLL_MS);
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = document.getElementById("token").value.trim();
  if (t) start(t);
});

(function init() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
    start(decodeURIComponent(m[1]));
  } else if (localStorage.getItem("lorafleet-token")) {
    start(localStorage.getItem("lorafleet-token"));
  }
})();
