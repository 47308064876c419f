// The lorafleet dashboard: the tenant's jobs with their training and validation loss, a page per job (its
// events, checkpoints, hyper-parameters and tokens/s) and every worker's heartbeat. It calls the same REST
// API as every client, with the token kept in this browser's localStorage (or given once as /#token=...).
// Every value from the API is inserted as text, never as HTML. Events are append-only (a listed event
// never changes id or place), so each job's list is read once and then followed from its last id.
"use strict";

const POLL_MS = 2000;
const MAX_EVENTS_SHOWN = 500;
const FINISHED = ["succeeded", "failed", "cancelled"];
const CANCELLABLE = ["validating_files", "queued", "running", "paused"];
const { colors, drawChart } = window.lfChart;
const state = { token: null, jobs: [], series: new Map(), checkpoints: new Map(), workers: [], timer: null, refreshing: false };

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function cell(row, text, attrs) { const td = el("td", attrs || {}, text); row.appendChild(td); return td; }

async function api(path, opts) {
  const r = await fetch(path, { ...(opts || {}), headers: { Authorization: "Bearer " + state.token } });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(msg);
  }
  return r;
}

function series(jobId) {
  let s = state.series.get(jobId);
  if (!s) {
    s = { after: null, events: [], train: new Map(), valid: new Map(), rate: [], complete: false };
    state.series.set(jobId, s);
  }
  return s;
}

async function fetchEvents(job) {
  // every new event, oldest first, from the last one read; a finished job's list is complete once read
  const s = series(job.id);
  if (s.complete) return;
  const finished = FINISHED.includes(job.status);
  for (;;) {
    const q = "?order=asc&limit=1000" + (s.after ? "&after=" + encodeURIComponent(s.after) : "");
    const page = await (await api("/v1/fine_tuning/jobs/" + job.id + "/events" + q)).json();
    for (const ev of page.data) {
      s.after = ev.id;
      s.events.push(ev);
      const d = ev.data || {};
      if (ev.type === "metrics" && typeof d.train_loss === "number") {
        s.train.set(d.step, d.train_loss);
        if (typeof d.tokens === "number" && typeof d.elapsed_s === "number") s.rate.push([d.step, d.tokens, d.elapsed_s]);
      }
      // a validation is its own event (older servers put valid_loss in the step's metrics event)
      if (typeof d.valid_loss === "number" && typeof d.step === "number") s.valid.set(d.step, d.valid_loss);
    }
    if (!page.has_more) break;
  }
  s.complete = finished;
}

function sorted(map) { return [...map.entries()].sort((a, b) => a[0] - b[0]); }
function last(map) { return map.size ? map.get(Math.max(...map.keys())) : undefined; }
function fmtLoss(x) { return x === undefined ? "-" : x.toFixed(4); }
function fmtTime(t) { return t ? new Date(t * 1000).toLocaleString() : "-"; }
function jobLabel(job) { return job.id + (job.user_provided_suffix ? " (" + job.user_provided_suffix + ")" : ""); }

// Training throughput over the job's latest steps of one run (a resumed run restarts its clock).
function tokensPerSecond(jobId) {
  const r = series(jobId).rate.slice().sort((a, b) => a[0] - b[0]);
  if (r.length === 0) return undefined;
  let i = r.length - 1;
  while (i > 0 && r.length - i < 20 && r[i - 1][2] <= r[i][2]) i--;
  const end = r[r.length - 1];
  if (i === r.length - 1) return end[2] > 0 ? end[1] / end[2] : undefined;
  const tokens = r.slice(i + 1).reduce((a, p) => a + p[1], 0);
  const dt = end[2] - r[i][2];
  return dt > 0 ? tokens / dt : undefined;
}
function fmtRate(x) { return x === undefined ? "-" : Math.round(x).toLocaleString("en-US"); }

function swatch(jobId) { return el("span", { class: "swatch", style: "background:" + colors.of(jobId) }); }

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
    await api("/v1/fine_tuning/jobs/" + job.id + "/cancel", { method: "POST" });
    refresh();
  } catch (e) { showMessage(e.message, true); }
}

function adapterCell(row, job) {
  const ad = cell(row, undefined);
  if (job.fine_tuned_model) {
    const b = el("button", { type: "button", class: "download" }, "download " + job.fine_tuned_model);
    b.addEventListener("click", () => download(job)); ad.appendChild(b);
  } else if (job.error) {
    ad.appendChild(el("span", { class: "error", title: job.error.message }, job.error.message.slice(0, 60)));
  } else ad.appendChild(el("span", { class: "muted" }, "-"));
}

function actionCell(row, job) {
  const act = cell(row, undefined);
  if (CANCELLABLE.includes(job.status)) {
    const b = el("button", { type: "button", class: "cancel" }, "cancel");
    b.addEventListener("click", () => cancel(job)); act.appendChild(b);
  }
}

function progress(job) {
  return job.lorafleet.step + " / " + (job.lorafleet.total_steps === null ? "?" : job.lorafleet.total_steps);
}

function renderTable() {
  const body = document.querySelector("#jobs tbody");
  const old = new Map([...body.querySelectorAll("tr.job-row")].map((tr) => [tr.dataset.job, tr]));
  const rows = [];
  for (const job of state.jobs) {
    const s = series(job.id);
    const tr = el("tr", { class: "job-row", "data-job": job.id, "data-status": job.status });
    cell(tr, undefined).appendChild(swatch(job.id));
    cell(tr, undefined).appendChild(el("a", { href: "#job=" + job.id, class: "job-link" }, jobLabel(job)));
    cell(tr, undefined).appendChild(el("span", { class: "status " + job.status }, job.status));
    cell(tr, progress(job), { class: "num" });
    cell(tr, fmtLoss(last(s.train)), { class: "num" });
    cell(tr, fmtLoss(last(s.valid)), { class: "num valid-loss" });
    cell(tr, fmtRate(tokensPerSecond(job.id)), { class: "num opt" });
    adapterCell(tr, job);
    cell(tr, fmtTime(job.created_at), { class: "opt" });
    actionCell(tr, job);
    rows.push(keepUnchanged(old.get(job.id), tr));
  }
  const now = [...body.children];
  if (rows.length !== now.length || rows.some((r, i) => r !== now[i])) body.replaceChildren(...rows);
}

// The row that was there, with only its changed cells replaced: a refresh (every POLL_MS) then never
// swaps the link or button under a pointer between its press and release, which would lose the click.
function keepUnchanged(prev, tr) {
  if (!prev || prev.cells.length !== tr.cells.length) return tr;
  for (let i = tr.cells.length - 1; i >= 0; i--) {
    if (prev.cells[i].innerHTML !== tr.cells[i].innerHTML || prev.cells[i].className !== tr.cells[i].className) {
      prev.replaceChild(tr.cells[i], prev.cells[i]);
    }
  }
  prev.dataset.status = tr.dataset.status;
  return prev;
}

function lineOf(job) {
  const s = series(job.id);
  return { id: job.id, label: jobLabel(job), color: colors.of(job.id), train: sorted(s.train), valid: sorted(s.valid) };
}

function renderLegend(box, lines) {
  box.replaceChildren();
  for (const l of lines) {
    if (!l.train.length && !l.valid.length) continue;
    const item = el("span", { class: "legend-item", "data-job": l.id });
    item.appendChild(swatch(l.id));
    item.appendChild(document.createTextNode(" " + l.label));
    box.appendChild(item);
  }
}

function renderWorkers() {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of state.workers) {
    const tr = el("tr", { class: "worker-row", "data-worker": w.id, "data-alive": String(w.alive) });
    cell(tr, w.id);
    cell(tr, w.host + " (pid " + w.pid + ")", { class: "opt" });
    cell(tr, w.base_model, { class: "opt wrap" });
    cell(tr, undefined).appendChild(el("span", { class: "status " + (w.alive ? "alive" : "dead") }, w.alive ? w.state : "not alive (" + w.state + ")"));
    cell(tr, w.active_jobs + " / " + w.max_concurrent_tasks, { class: "num" });
    cell(tr, w.heartbeat_age_s.toFixed(1) + " s ago", { class: "num heartbeat" });
    cell(tr, w.message || "", { class: "opt wrap" });
    body.appendChild(tr);
  }
  if (!state.workers.length) {
    const tr = el("tr"); cell(tr, "no worker has announced itself yet", { colspan: "7", class: "muted" }); body.appendChild(tr);
  }
}

// -- the job page ---------------------------------------------------------------------------------------

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? prefix + "." + k : k;
    if (v !== null && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out.push([key, Array.isArray(v) ? v.join(", ") : String(v)]);
  }
  return out;
}

function kvRows(tbody, rows) {
  tbody.replaceChildren();
  for (const [k, v] of rows) { const tr = el("tr"); cell(tr, k, { class: "key" }); cell(tr, v, { class: "wrap" }); tbody.appendChild(tr); }
}

async function renderJobPage(jobId) {
  const job = state.jobs.find((j) => j.id === jobId);
  const title = document.getElementById("job-title");
  if (!job) { title.textContent = "job " + jobId + " is not among your 100 newest jobs"; return; }
  const s = series(job.id);
  title.replaceChildren(swatch(job.id), document.createTextNode(" " + jobLabel(job) + " "), el("span", { class: "status " + job.status }, job.status));
  const act = document.getElementById("job-actions");
  act.replaceChildren();
  if (CANCELLABLE.includes(job.status)) {
    const b = el("button", { type: "button", class: "cancel" }, "cancel job");
    b.addEventListener("click", () => cancel(job)); act.appendChild(b);
  }
  if (job.fine_tuned_model) {
    const b = el("button", { type: "button", class: "download" }, "download " + job.fine_tuned_model);
    b.addEventListener("click", () => download(job)); act.appendChild(b);
  }
  kvRows(document.querySelector("#job-summary tbody"), [
    ["status", job.status + (job.error ? ": " + job.error.message : "")], ["progress", progress(job) + " steps"],
    ["training loss", fmtLoss(last(s.train))], ["validation loss", fmtLoss(last(s.valid))],
    ["tokens/s", fmtRate(tokensPerSecond(job.id))], ["trained tokens", String(job.trained_tokens ?? s.rate.reduce((a, p) => a + p[1], 0))],
    ["base model", job.model], ["adapter", job.lorafleet.adapter_id], ["training file", job.training_file],
    ["validation file", job.validation_file || "-"], ["created", fmtTime(job.created_at)],
    ["started", fmtTime(job.started_at)], ["finished", fmtTime(job.finished_at)],
  ]);
  const { adapter_id, step, total_steps, ...settings } = job.lorafleet;
  kvRows(document.querySelector("#job-params tbody"), [
    ["method", job.method.type], ["seed", String(job.seed)],
    ...flatten(job.hyperparameters, "", []), ...flatten(settings, "", []),
  ].filter(([, v]) => v !== "null"));
  const line = lineOf(job);
  drawChart(document.getElementById("job-chart"), [line]);
  try {
    const page = await (await api("/v1/fine_tuning/jobs/" + job.id + "/checkpoints?limit=100")).json();
    state.checkpoints.set(job.id, page.data);
  } catch (e) { showMessage(e.message, true); }
  const cb = document.querySelector("#job-checkpoints tbody");
  cb.replaceChildren();
  for (const c of state.checkpoints.get(job.id) || []) {
    const tr = el("tr", { class: "checkpoint-row" });
    cell(tr, String(c.step_number), { class: "num" });
    cell(tr, fmtLoss(c.metrics.train_loss), { class: "num" });
    cell(tr, c.fine_tuned_model_checkpoint, { class: "wrap" });
    cell(tr, fmtTime(c.created_at), { class: "opt" });
    cb.appendChild(tr);
  }
  const eb = document.querySelector("#job-events tbody");
  eb.replaceChildren();
  // the newest MAX_EVENTS_SHOWN (the API pages through all of them: lorafleet jobs show --events N)
  for (const ev of s.events.slice(-MAX_EVENTS_SHOWN).reverse()) {
    const tr = el("tr", { class: "event-row " + ev.level, "data-type": ev.type, "data-id": ev.id });
    cell(tr, new Date(ev.created_at * 1000).toLocaleTimeString(), { class: "num" });
    cell(tr, ev.type + (ev.level !== "info" ? " (" + ev.level + ")" : ""), { class: "opt" });
    cell(tr, ev.message, { class: "wrap" });
    eb.appendChild(tr);
  }
}

// -- refresh and routing --------------------------------------------------------------------------------

function currentJob() {
  const m = /^#job=([A-Za-z0-9_-]+)$/.exec(location.hash);
  return m ? m[1] : null;
}

function render() {
  const jobId = currentJob();
  document.getElementById("overview").hidden = jobId !== null;
  document.getElementById("job-view").hidden = jobId === null;
  if (jobId !== null) return renderJobPage(jobId);
  renderTable();
  const lines = state.jobs.map(lineOf);
  drawChart(document.getElementById("chart"), lines);
  renderLegend(document.getElementById("legend"), lines);
  renderWorkers();
}

function showMessage(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = isError ? "error" : "muted";
}

async function refresh() {
  // one refresh at a time: two would read the same events twice (a slow server takes longer than POLL_MS)
  if (state.refreshing) return;
  state.refreshing = true;
  try { await refreshOnce(); } finally { state.refreshing = false; }
}

async function refreshOnce() {
  try {
    const h = await (await fetch("/healthz")).json();
    state.workers = h.workers || [];
    const alive = state.workers.filter((w) => w.alive).length;
    document.getElementById("health").textContent = "model " + h.model + " | " + alive + " of " + state.workers.length + " worker(s) alive";
  } catch (e) { /* health is informational */ }
  if (!state.token) return;
  try {
    const page = await (await api("/v1/fine_tuning/jobs?limit=100")).json();
    state.jobs = page.data;
    colors.assign(state.jobs);
    await Promise.all(state.jobs.map(fetchEvents));
    await render();
    showMessage(state.jobs.length + " job(s); updated " + new Date().toLocaleTimeString(), false);
    document.body.setAttribute("data-loaded", String(Date.now()));
  } catch (e) {
    showMessage(e.message, true);
  }
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
window.addEventListener("hashchange", () => { if (state.token) render(); });
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (state.token) render(); }, 100);
});

(function init() {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar
    start(decodeURIComponent(m[1]));
  } else if (localStorage.getItem("lorafleet-token")) {
    start(localStorage.getItem("lorafleet-token"));
  } else refresh();
})();
