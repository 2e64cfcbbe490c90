// canary-proxy dashboard: polls /status and /series, draws the charts on <canvas>, and
// sends the control actions with the admin token (asked once, kept in sessionStorage).
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "canary-admin-token";
const COLORS = { baseline: "#3b6fd8", canary: "#e8770e", warning: "#d99a00", critical: "#d63b3b", grid: "#e3e7ee", text: "#667085" };
const $ = (id) => document.getElementById(id);

// -- formatting ---------------------------------------------------------------------------
function pct(rate, digits = 2) {
  return rate == null ? "–" : (rate * 100).toFixed(digits) + "%";
}
function secs(value) {
  if (value == null) return "–";
  if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 1 : 0) + " ms";
  if (value < 120) return value.toFixed(value < 10 ? 2 : 0) + " s";
  return (value / 60).toFixed(1) + " min";
}
function clock(iso) {
  const d = typeof iso === "number" ? new Date(iso * 1000) : new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleTimeString([], { hour12: false });
}
function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// -- rendering the status ------------------------------------------------------------------
function renderStatus(status) {
  $("state").textContent = status.state.replace("_", " ");
  $("state").className = "badge big s-" + status.state;
  $("reason").textContent = status.reason || "";
  $("since").textContent = `at ${status.weight}% since ${clock(status.stage_started_at)}`;
  $("weight").textContent = status.weight + "%";
  $("stage").textContent = status.state === "shadow" ? "shadow: copies only, every client gets the baseline"
    : status.stage ? `stage ${status.stage} of ${status.stages.length}` : (status.weight ? "pinned weight" : "no canary traffic");
  renderStages(status);
  renderShadow(status.shadow || {});
  renderBake(status.bake || {}, status.state);
  renderVerdict(status.verdict || {});
  const thresholds = ((status.verdict || {}).evidence || {}).thresholds || {};
  for (const arm of ["baseline", "canary"]) renderArm(arm, status.arms[arm], arm === "canary" ? thresholds : null);
  renderConfig(status.config || {}, status.store || {});
  renderEvidence((status.verdict || {}).evidence || {});
  renderHistory(status.history || []);
  renderReplicas(status);
}

function renderReplicas(status) {
  // state.backend: redis — every replica of the shared rollout (CONTRACT §7)
  $("replicas-panel").hidden = !status.replicas;
  if (!status.replicas) return;
  $("replica-self").textContent = status.replica_id;
  const rows = status.replicas.map((r) => {
    const row = el("tr", null, r.id === status.replica_id ? "self" : "");
    row.dataset.replica = r.id;
    row.append(el("td", r.id), el("td", r.weight + "%"), el("td", r.state.replace("_", " ")),
      el("td", r.decider ? "decider" : ""), el("td", clock(r.last_seen)));
    return row;
  });
  $("replicas").replaceChildren(...rows);
  const backend = status.backend || {};
  $("replica-backend").textContent = backend.error ? `Redis not answering: ${backend.error}`
    : `Redis ${backend.url}, keys ${backend.keys}; lease held by ${(status.lease || {}).holder || "nobody"}`;
}

function renderStages(status) {
  const box = $("stages");
  box.replaceChildren();
  if (status.shadow && status.shadow.duration > 0) {
    box.append(el("span", "shadow", status.state === "shadow" ? "current" : status.weight > 0 ? "done" : ""));
  }
  for (const stage of status.stages) {
    const cls = stage === status.weight ? "current" : stage < status.weight ? "done" : "";
    box.append(el("span", stage + "%", cls));
  }
}

function renderShadow(shadow) {
  const line = $("shadow");
  line.hidden = !(shadow.duration > 0 || shadow.mirrored > 0);
  const dropped = Object.values(shadow.dropped || {}).reduce((a, b) => a + b, 0);
  line.textContent = `shadow copies: ${shadow.mirrored || 0} mirrored, ${dropped} dropped` +
    (shadow.active ? `, ${shadow.inflight || 0} in flight, ${shadow.queued || 0} queued` : "");
}

function renderBake(bake, state) {
  const fraction = bake.required ? Math.min(1, bake.elapsed / bake.required) : 1;
  $("bake-bar").style.width = (fraction * 100).toFixed(1) + "%";
  const waiting = state === "progressing" || state === "shadow" ? "" : ` (no automatic promotion while ${state.replace("_", " ")})`;
  $("bake").textContent = `${secs(bake.elapsed)} of ${secs(bake.required)}${waiting}`;
}

function renderVerdict(verdict) {
  const level = verdict.level || "insufficient_data";
  $("verdict").textContent = level.replace("_", " ");
  $("verdict").className = "badge big l-" + level;
  $("verdict-reasons").replaceChildren(...(verdict.reasons || []).map((r) => el("li", r)));
}

function renderArm(arm, figures, thresholds) {
  const row = $("arm-" + arm);
  const shown = {
    requests: figures.requests, errors: figures.errors, error_rate: pct(figures.error_rate),
    p50: secs(figures.p50), p95: secs(figures.p95), p99: secs(figures.p99), inflight: figures.inflight,
    websockets_open: figures.websockets_open ?? 0,
  };
  for (const cell of row.querySelectorAll("td")) {
    cell.textContent = shown[cell.dataset.k];
    cell.className = thresholds ? severityClass(cell.dataset.k, figures, thresholds) : "";
  }
}

function severityClass(key, figures, t) {
  const checks = {
    error_rate: [figures.error_rate, t["errors.warning"], t["errors.critical"]],
    p95: [figures.p95, t["latency.p95_warning"], Infinity],
    p99: [figures.p99, Infinity, t["latency.p99_critical"]],
  }[key];
  if (!checks || checks[0] == null) return "";
  if (checks[0] > checks[2]) return "crit";
  return checks[0] > checks[1] ? "warn" : "";
}

function renderConfig(config, store) {
  $("config-path").textContent = config.path ? `${config.path} · loaded ${clock(config.loaded_at)}` : "";
  $("config-error").hidden = !config.error;
  $("config-error-text").textContent = config.error || "";
  $("store-error").hidden = !store.error;
  $("store-error").textContent = store.error ? "State store problem: " + store.error : "";
}

function renderEvidence(evidence) {
  const c = evidence.comparison || {};
  const arms = ["canary", "baseline"].map((arm) => {
    const f = evidence[arm] || {};
    return `${arm} ${f.errors ?? 0}/${f.requests ?? 0} errors (${pct(f.error_rate)})`;
  });
  const noData = !((evidence.canary || {}).requests);
  const interval = c.ci95 ? ` (95% CI ${pct(c.ci95[0])} … ${pct(c.ci95[1])}), confidence canary is worse ${pct(c.confidence_worse, 0)}` :
    " (no interval: an arm has no requests at this weight)";
  const diff = c.error_rate_diff == null || noData ? " · no canary requests at this weight yet" :
    ` · canary − baseline ${(c.error_rate_diff * 100).toFixed(2)} points${interval}${c.required ? "" : " (comparison not required)"}`;
  $("comparison").textContent = arms.join(" · ") + diff;
  const rows = Object.entries(evidence.tests || {}).map(([name, test]) => {
    const row = el("tr");
    const bar = el("div", null, "bar");
    const fill = el("div", null, test.open ? "open" : "");
    fill.style.width = Math.min(100, Math.max(0, (test.score / test.threshold) * 100)).toFixed(1) + "%";
    bar.append(fill);
    const cell = el("td");
    cell.append(bar);
    const ci = test.ci ? `${pct(test.ci[0])} … ${pct(test.ci[1])}` : "—";
    const shown = test.open ? "OPEN" : test.above ? "shown above" : test.below ? "shown below" : "closed";
    row.append(el("td", name), el("td", test.estimate == null ? "—" : pct(test.estimate)), el("td", ci),
      el("td", pct(test.limit ?? test.expected)), el("td", `${test.score.toFixed(2)} / ${test.threshold.toFixed(2)}`), cell,
      el("td", shown, test.open || test.above ? "crit" : test.below ? "ok" : ""));
    return row;
  });
  $("tests").replaceChildren(...rows);
  const t = evidence.thresholds || {};
  $("thresholds").textContent = `Thresholds: error rate warning ${pct(t["errors.warning"], 1)}, critical ${pct(t["errors.critical"], 1)} · ` +
    `p95 warning ${secs(t["latency.p95_warning"])} · p99 critical ${secs(t["latency.p99_critical"])} · ` +
    `verdicts after ${t["analysis.min_requests"] ?? "?"} canary requests (sequential tests: a test acts when its score reaches its boundary; promotion needs every rate's anytime ${pct(1 - (t["analysis.beta"] ?? 0.05), 0)} upper bound below its limit)`;
}

function renderHistory(history) {
  const rows = history.slice().reverse().map((h) => {
    const row = el("tr");
    row.append(el("td", clock(h.at)), el("td", h.action.replace("_", " ")), el("td", h.trigger, "t-" + h.trigger),
      el("td", `${h.from_weight}% → ${h.weight}%`), el("td", h.state.replace("_", " ")), el("td", h.reason));
    return row;
  });
  $("history").replaceChildren(...rows);
}

// -- charts ----------------------------------------------------------------------------------
function drawChart(canvas, { t, lines, thresholds, format, minTop, fitThresholds }) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const pad = { left: 58, right: 12, top: 16, bottom: 22 };
  const finite = (v) => v != null && isFinite(v);
  const data = lines.flatMap((l) => l.values).filter(finite);
  const limits = thresholds.filter((th) => finite(th.value));
  const top = niceTop(Math.max(minTop, ...data, ...(fitThresholds ? limits.map((th) => th.value) : [])));
  const x0 = t.length ? t[0] : 0, x1 = t.length > 1 ? t[t.length - 1] : x0 + 1;
  const X = (v) => pad.left + ((v - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (v) => pad.top + (1 - v / top) * (height - pad.top - pad.bottom);
  drawGrid(g, { width, height, pad, top, Y, format, t, X });
  limits.forEach((th, i) => drawThreshold(g, th, th.value <= top ? Y(th.value) : null, { width, pad, row: i }));
  for (const line of lines) drawLine(g, t, line, X, Y);
  if (!t.length) {
    g.fillStyle = COLORS.text; g.textAlign = "center";
    g.fillText("collecting data…", width / 2, height / 2);
  }
}

function drawThreshold(g, th, y, { width, pad, row }) {
  g.font = "11px system-ui, sans-serif"; g.textAlign = "right"; g.fillStyle = th.color;
  if (y == null) {  // far above every value: say so instead of squashing the lines flat
    g.fillText(`${th.label} ↑ (above the chart)`, width - pad.right - 2, pad.top - 4 + row * 13);
    return;
  }
  g.strokeStyle = th.color; g.setLineDash([6, 4]); g.lineWidth = 1.5;
  g.beginPath(); g.moveTo(pad.left, y); g.lineTo(width - pad.right, y); g.stroke();
  g.setLineDash([]);
  g.fillText(th.label, width - pad.right - 2, y - 3);
}

function niceTop(value) {
  if (!(value > 0)) return 1;
  const base = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * base >= value * 1.1) return step * base;
  return 10 * base;
}

function drawGrid(g, { width, height, pad, top, Y, format, t, X }) {
  g.font = "11px system-ui, sans-serif"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    g.strokeStyle = COLORS.grid; g.beginPath(); g.moveTo(pad.left, Y(v)); g.lineTo(width - pad.right, Y(v)); g.stroke();
    g.fillStyle = COLORS.text; g.textAlign = "right"; g.fillText(format(v), pad.left - 6, Y(v) + 4);
  }
  if (t.length > 1) {
    const ticks = [[0, "left"], [Math.floor((t.length - 1) / 2), "center"], [t.length - 1, "right"]];
    for (const [i, align] of ticks) { g.textAlign = align; g.fillText(clock(t[i]), X(t[i]), height - 6); }
  }
}

function drawLine(g, t, line, X, Y) {
  g.strokeStyle = line.color; g.lineWidth = line.width || 2; g.beginPath();
  let drawing = false;
  t.forEach((time, i) => {
    const v = line.values[i];
    if (v == null) { drawing = false; return; }
    if (!drawing) { g.moveTo(X(time), Y(v)); drawing = true; } else if (line.step) { g.lineTo(X(time), Y(line.values[i - 1])); g.lineTo(X(time), Y(v)); } else { g.lineTo(X(time), Y(v)); }
  });
  g.stroke();
  const last = line.values.length - 1;
  if (last >= 0 && line.values[last] != null) {
    g.fillStyle = line.color; g.beginPath(); g.arc(X(t[last]), Y(line.values[last]), 3, 0, 2 * Math.PI); g.fill();
  }
}

function renderCharts(series, status) {
  const thresholds = ((status.verdict || {}).evidence || {}).thresholds || {};
  const arms = (key) => ["baseline", "canary"].map((arm) => ({ values: series[arm][key], color: COLORS[arm] }));
  drawChart($("chart-errors"), {
    t: series.t, lines: arms("error_rate"), format: (v) => pct(v, 1), minTop: 0.01, fitThresholds: true,
    thresholds: [
      { value: thresholds["errors.warning"], label: "warning " + pct(thresholds["errors.warning"], 1), color: COLORS.warning },
      { value: thresholds["errors.critical"], label: "critical " + pct(thresholds["errors.critical"], 1), color: COLORS.critical },
    ],
  });
  drawChart($("chart-p95"), {
    t: series.t, lines: arms("p95"), format: secs, minTop: 0.05,
    thresholds: [
      { value: thresholds["latency.p95_warning"], label: "p95 warning " + secs(thresholds["latency.p95_warning"]), color: COLORS.warning },
      { value: thresholds["latency.p99_critical"], label: "p99 critical " + secs(thresholds["latency.p99_critical"]), color: COLORS.critical },
    ],
  });
  drawChart($("chart-weight"), {
    t: series.t, lines: [{ values: series.weight, color: COLORS.canary, step: true, width: 2.5 }],
    format: (v) => v.toFixed(0) + "%", minTop: 90, thresholds: [],
  });
}

// -- polling ---------------------------------------------------------------------------------
let lastStatus = null;

async function fetchJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const [status, series] = await Promise.all([fetchJSON("/status"), fetchJSON("/series")]);
    lastStatus = status;
    renderStatus(status);
    renderCharts(series, status);
    $("offline").hidden = true;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
    $("updated").className = "updated";
    document.body.dataset.loaded = "true";
  } catch (err) {
    $("offline").hidden = false;
    $("updated").className = "updated stale";
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

// -- control actions ---------------------------------------------------------------------------
function askToken() {
  const dialog = $("token-dialog");
  $("token-input").value = "";
  return new Promise((resolve) => {
    const done = (token) => { dialog.close(); cleanup(); resolve(token); };
    const submit = (event) => { event.preventDefault(); done($("token-input").value.trim() || null); };
    const cancel = () => done(null);
    const cleanup = () => { $("token-form").removeEventListener("submit", submit); $("token-cancel").removeEventListener("click", cancel); dialog.removeEventListener("cancel", cancel); };
    $("token-form").addEventListener("submit", submit);
    $("token-cancel").addEventListener("click", cancel);
    dialog.addEventListener("cancel", cancel);
    dialog.showModal();
    $("token-input").focus();
  });
}

function showTokenState() {
  const has = Boolean(sessionStorage.getItem(TOKEN_KEY));
  $("token-state").textContent = has ? "entered (kept for this tab)" : "not entered";
  $("btn-forget").hidden = !has;
}

function say(text, ok) {
  $("action-result").textContent = text;
  $("action-result").className = "small " + (ok ? "ok" : "err");
}

async function post(action, token) {
  return fetch("/" + action, {
    method: "POST",
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
    body: JSON.stringify({ reason: "dashboard " + action }),
  });
}

async function runAction(action) {
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) token = await askToken();
  if (!token) { say("cancelled: no admin token entered", false); return; }
  const buttons = document.querySelectorAll(".controls button[data-action]");
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const response = await post(action, token);
    const body = await response.json().catch(() => ({}));
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      say("the admin token was rejected — click again to enter it", false);
    } else if (!response.ok) {
      say(`${action} failed: ${body.error || "HTTP " + response.status}`, false);
    } else {
      sessionStorage.setItem(TOKEN_KEY, token);
      say(`${action}: now ${body.state.replace("_", " ")} at ${body.weight}%`, true);
      renderStatus(body);
    }
  } catch (err) {
    say(`${action} failed: the admin listener is not answering`, false);
  } finally {
    buttons.forEach((b) => { b.disabled = false; });
    showTokenState();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll(".controls button[data-action]")) {
    button.addEventListener("click", () => runAction(button.dataset.action));
  }
  $("btn-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTokenState(); });
  window.addEventListener("resize", () => { if (lastStatus) refresh(); });
  showTokenState();
  loop();
});
