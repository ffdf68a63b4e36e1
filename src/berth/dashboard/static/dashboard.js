// Berth's dashboard: endpoints, live charts per endpoint, the autoscaler's decisions, a query box.
// The token lives in sessionStorage only (this tab, until it closes); every API call sends it.
"use strict";

const API = "/api/2.0/serving-endpoints";
const KEY = "berth.token";
const POLL_MS = 1000;
const state = { token: sessionStorage.getItem(KEY), selected: null, timer: null };
// The charts and their data, for people and for tests (`window.berth.charts.qps.data`).
window.berth = { charts: {}, lastSeries: null };

function $(id) { return document.getElementById(id); }

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${state.token}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const text = await response.text();
  let body = text;
  try { body = JSON.parse(text); } catch (e) { /* not JSON: keep the text */ }
  if (response.status === 401) { signOut("The token was refused."); }
  return { status: response.status, body };
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  state.token = null;
  clearInterval(state.timer);
  $("main").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function signIn(token) {
  state.token = token;
  const me = await api("/api/2.0/preview/scim/v2/Me");
  if (me.status !== 200) { signOut(`The token was refused (${me.status}).`); return; }
  sessionStorage.setItem(KEY, token);
  $("whoami").textContent = me.body.userName || me.body.displayName || "";
  $("login").hidden = true;
  $("main").hidden = false;
  $("signout").hidden = false;
  await refresh();
  clearInterval(state.timer);
  state.timer = setInterval(refresh, POLL_MS);
}

function readyClass(ep) {
  if (ep.state.config_update === "UPDATE_FAILED") return "failed";
  return ep.state.ready === "READY" ? "ready" : "not-ready";
}

function renderEndpoints(endpoints) {
  const body = $("endpoints").querySelector("tbody");
  body.replaceChildren(...endpoints.map((ep) => {
    const row = document.createElement("tr");
    row.dataset.name = ep.name;
    if (ep.name === state.selected) row.classList.add("selected");
    const entities = ((ep.config || {}).served_entities || []).map((e) => e.name).join(", ");
    const cells = [ep.name, ep.state.ready, ep.state.config_update, entities, (ep.config || {}).config_version ?? ""];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      if (i === 1) cell.className = readyClass(ep);
      row.appendChild(cell);
    });
    row.addEventListener("click", () => select(ep.name));
    return row;
  }));
}

function chart(id, title, series, target) {
  const width = Math.min(560, Math.max(320, window.innerWidth / 3 - 30));
  const opts = {
    width, height: 220, title: "",
    scales: { x: { time: true } },
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: false }))],
    axes: [{}, { size: 50 }],
  };
  const data = [[], ...series.map(() => [])];
  const plot = new uPlot(opts, data, $(target));
  window.berth.charts[id] = plot;
  return plot;
}

function ensureCharts() {
  if (window.berth.charts.qps) return;
  chart("qps", "QPS", [["requests/s", "#1f6fb2"], ["errors/s", "#c62828"]], "chart-qps");
  chart("latency", "Latency", [["p50 ms", "#2e7d32"], ["p99 ms", "#ef6c00"]], "chart-latency");
  chart("replicas", "Replicas", [["ready replicas", "#5e35b1"], ["per-replica concurrency", "#00897b"],
                                 ["requests held", "#8d6e63"]], "chart-replicas");
}

function entityTotals(entities) {
  // The entities are sampled in the same ticks (one time for all): sum them by time, so that an entity
  // that joined later (a rollout) adds to the right points.
  const byTime = new Map();
  for (const e of Object.values(entities)) {
    e.t.forEach((t, i) => {
      const point = byTime.get(t) || { ready: 0, concurrency: 0, inFlight: 0 };
      point.ready += e.ready[i] || 0;
      point.concurrency = Math.max(point.concurrency, e.concurrency[i] || 0);
      point.inFlight += e.in_flight[i] || 0;
      byTime.set(t, point);
    });
  }
  const t = [...byTime.keys()].sort((a, b) => a - b);
  return [t, t.map((x) => byTime.get(x).ready), t.map((x) => byTime.get(x).concurrency),
          t.map((x) => byTime.get(x).inFlight)];
}

function hashEndpoint() {
  const found = location.hash.match(/endpoint=([^&]+)/);
  if (!found) return null;
  try { return decodeURIComponent(found[1]); } catch (e) { return null; }  // a malformed %-escape
}

function renderSeries(series) {
  window.berth.lastSeries = series;
  ensureCharts();
  window.berth.charts.qps.setData([series.t, series.qps, series.errors_per_s]);
  window.berth.charts.latency.setData([series.t, series.p50_ms, series.p99_ms]);
  window.berth.charts.replicas.setData(entityTotals(series.entities));
  const body = $("decisions").querySelector("tbody");
  const rows = series.decisions.slice(-10).reverse().map((d) => {
    const row = document.createElement("tr");
    const when = new Date(d.timestamp * 1000).toLocaleTimeString();
    [when, d.served_entity_name, `${d.previous ?? "?"} → ${d.desired}`, d.concurrency, d.reason].forEach((v) => {
      const cell = document.createElement("td");
      cell.textContent = String(v ?? "");
      row.appendChild(cell);
    });
    return row;
  });
  body.replaceChildren(...rows);
}

async function refresh() {
  const list = await api(API);
  if (list.status !== 200) return;
  const endpoints = list.body.endpoints || [];
  if (!state.selected && endpoints.length) {
    const wanted = hashEndpoint();
    state.selected = endpoints.some((ep) => ep.name === wanted) ? wanted : endpoints[0].name;
  }
  renderEndpoints(endpoints);
  const current = endpoints.find((ep) => ep.name === state.selected);
  $("detail").hidden = !current;
  if (!current) return;
  $("detail-name").textContent = current.name;
  $("detail-config").textContent = JSON.stringify(current.config || {}, null, 2);
  const series = await api(`${API}/${encodeURIComponent(current.name)}/series`);
  if (series.status === 200) renderSeries(series.body);
}

function select(name) {
  state.selected = name;
  location.hash = `endpoint=${encodeURIComponent(name)}`;
  $("query-answer").textContent = "";
  refresh();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", () => signOut(""));
$("query-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!state.selected) return;
  const answer = await api(`/serving-endpoints/${encodeURIComponent(state.selected)}/invocations`,
                           { method: "POST", body: $("query-body").value });
  $("query-answer").textContent = `${answer.status}\n` + (typeof answer.body === "string"
    ? answer.body : JSON.stringify(answer.body, null, 2));
});

if (state.token) { signIn(state.token); } else { signOut(""); }
