// The mltap dashboard: reads /api/models and /api/models/{model}/series, draws the
// charts with uPlot, and follows /api/events (Server-Sent Events) to merge each
// closed bucket without reloading. Everything it needs is bundled: no CDN.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./style.css";

const RANGES = [
  ["15 min", 900],
  ["1 h", 3600],
  ["24 h", 86400],
];
const PALETTE = [
  "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
];
// Metrics of the overview charts, fetched in one request.
const OVERVIEW_METRICS = [
  "buffer_count", "request_count", "prediction_freq", "prediction_count", "max_prediction_proba",
  "estimated_accuracy", "accuracy", "prediction_drift",
  // Regression models: the predictions' distribution and the errors from labels.
  "prediction_value", "mae", "rmse",
];
// Capture health is counted before a payload is decoded, so its points may carry no
// version: it is fetched for the whole model, and from the pseudo-model of facts
// that belong to no model (capture drops, errors of unknown models).
const HEALTH_METRICS = ["capture_dropped", "decode_errors", "label_late_count"];
const GLOBAL_MODEL = "__mltap__";
// Drift methods in order of preference for the heat strip and feature titles.
const DRIFT_METHODS = ["psi", "js", "linf"];

const state = {
  models: [],
  model: null,
  stream: null,
  range: Number(new URLSearchParams(location.search).get("range")) || 3600,
  data: null, // { buckets: number[], series: Map<key, {what, labels, values}> }
  shape: "", // series keys the charts were built for; a change rebuilds them
  charts: new Map(), // id -> { plot, spec }: drawn charts only
  strip: null,
  lazy: { observer: null, plots: new Map(), visible: new Set(), stale: new Set() },
  liveUpdates: 0,
  timings: {}, // milliseconds of the last merge, chart build and strip paint
  lastEvent: null,
  firstRenderMs: null,
  pending: Promise.resolve(),
};
// Read-only handle for scripts and tests: the uPlot instances and live counters.
window.mltapDashboard = state;

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
};

const seriesKey = (s) => s.what + "|" + Object.entries(s.labels).map(([k, v]) => k + "=" + v).join("|");

function streamFilters() {
  const p = new URLSearchParams();
  if (state.stream?.version) p.set("version", state.stream.version);
  if (state.stream?.signature) p.set("signature", state.stream.signature);
  return p;
}

async function getJson(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${await r.text()}`);
  return r.json();
}

// The four requests behind one view; `since` limits them to updated buckets.
async function fetchSeries(model, since) {
  const base = `/api/models/${encodeURIComponent(model)}/series?`;
  const range = since === undefined ? { last: String(state.range) } : { since: String(since) };
  const q = (params, whole = false) => {
    const p = whole ? new URLSearchParams() : streamFilters();
    for (const [k, v] of Object.entries({ ...params, ...range })) p.set(k, v);
    return getJson(base + p.toString());
  };
  const global = state.models.some((m) => m.model === GLOBAL_MODEL) && model !== GLOBAL_MODEL;
  const globalHealth = () => {
    const p = new URLSearchParams({ what: HEALTH_METRICS.join(","), ...range });
    return getJson(`/api/models/${GLOBAL_MODEL}/series?${p}`).then((a) => ({
      ...a,
      series: a.series.map((s) => ({ ...s, labels: { ...s.labels, scope: "global" } })),
    }));
  };
  return Promise.all([
    global ? globalHealth() : { buckets: [], series: [] },
    q({ what: OVERVIEW_METRICS.join(",") }),
    q({ what: HEALTH_METRICS.join(",") }, true),
    q({ what: "feature_value", stat: "mean,q25,q75" }),
    q({ what: "feature_drift", method: "psi" }).then((a) =>
      a.series.length ? a : q({ what: "feature_drift" })),
  ]);
}

// Merges answers into `data` by bucket: answers win for the buckets they cover.
// Runs on every live update, so positions are mapped once per source, not per value.
function merge(data, answers) {
  const t0 = performance.now();
  const buckets = new Set(data ? data.buckets : []);
  for (const a of answers) for (const b of a.buckets) buckets.add(b);
  const sorted = [...buckets].sort((x, y) => x - y);
  const latest = sorted.length ? sorted[sorted.length - 1] : 0;
  const kept = sorted.filter((b) => b >= latest - state.range);
  const index = new Map(kept.map((b, i) => [b, i]));
  const positions = (from) => Int32Array.from(from, (b) => index.get(b) ?? -1);
  const series = new Map();
  const place = (s, at) => {
    const key = seriesKey(s);
    let target = series.get(key);
    if (!target) {
      target = { what: s.what, labels: s.labels, values: new Array(kept.length).fill(null) };
      series.set(key, target);
    }
    const values = s.values;
    const out = target.values;
    for (let i = 0; i < at.length; i++) {
      const j = at[i];
      if (j >= 0 && values[i] !== null) out[j] = values[i];
    }
  };
  if (data) {
    const at = positions(data.buckets);
    for (const s of data.series.values()) place(s, at);
  }
  for (const a of answers) {
    const at = positions(a.buckets);
    for (const s of a.series) place(s, at);
  }
  for (const [k, s] of series) if (s.values.every((v) => v === null)) series.delete(k);
  state.timings.mergeMs = performance.now() - t0;
  return { buckets: kept, series };
}

function pick(what, filter = () => true) {
  const out = [];
  for (const s of state.data.series.values()) if (s.what === what && filter(s.labels)) out.push(s);
  return out;
}

const natural = new Intl.Collator(undefined, { numeric: true }).compare;

function driftMethod(seriesList) {
  const have = new Set(seriesList.map((s) => s.labels.method));
  return DRIFT_METHODS.find((m) => have.has(m)) ?? [...have][0];
}

// ---------- chart builders: each returns { title, series, bands?, data, opts? } ----------

function trafficChart() {
  const rows = pick("buffer_count");
  const reqs = pick("request_count").sort((a, b) => natural(seriesKey(a), seriesKey(b)));
  const series = [];
  const data = [];
  rows.forEach((s) => { series.push({ label: "rows", stroke: PALETTE[0], width: 2 }); data.push(s.values); });
  reqs.forEach((s, i) => {
    series.push({ label: `requests ${s.labels.method ?? ""} ${s.labels.status ?? ""}`.trim(), stroke: PALETTE[(i + 1) % 10] });
    data.push(s.values);
  });
  return { title: "Requests and rows per bucket", series, data };
}

function classesChart() {
  let list = pick("prediction_freq");
  const share = list.length > 0;
  if (!share) list = pick("prediction_count");
  list.sort((a, b) => natural(a.labels.class_name ?? "", b.labels.class_name ?? ""));
  const raw = list.map((s) => s.values);
  const n = state.data.buckets.length;
  const stacked = [];
  let below = new Array(n).fill(0);
  for (const values of raw) {
    const sum = values.map((v, i) => (v === null ? below[i] : below[i] + v));
    stacked.push(sum);
    below = sum;
  }
  const series = list.map((s, i) => ({
    label: s.labels.class_name ?? `series ${i}`,
    stroke: PALETTE[i % 10],
    fill: i === 0 ? PALETTE[0] + "99" : undefined,
    value: (u, v, si, idx) => (idx == null || raw[si - 1][idx] == null ? "–" : fmt(raw[si - 1][idx])),
  }));
  const bands = list.slice(1).map((_, i) => ({ series: [i + 2, i + 1], fill: PALETTE[(i + 1) % 10] + "99" }));
  return {
    title: share ? "Predicted class distribution (share of rows, stacked)" : "Predicted classes (rows, stacked)",
    series, bands, data: stacked,
    scales: share ? { y: { range: [0, 1] } } : undefined,
  };
}

function quantileChart(title, list, color, scales) {
  const stat = (name) => list.find((s) => s.labels.stat === name);
  const mid = stat("mean") ?? stat("median") ?? stat("q50");
  const lo = stat("q25");
  const hi = stat("q75");
  const series = [];
  const data = [];
  if (hi && lo) {
    series.push({ label: "q75", stroke: color + "55", width: 1 });
    data.push(hi.values);
    series.push({ label: "q25", stroke: color + "55", width: 1 });
    data.push(lo.values);
  }
  if (mid) {
    series.push({ label: mid.labels.stat, stroke: color, width: 2 });
    data.push(mid.values);
  }
  const bands = hi && lo ? [{ series: [1, 2], fill: color + "33" }] : [];
  return { title, series, bands, data, scales };
}

function probaChart() {
  // The line is the median: the mean of a top-1 probability hides a bimodal model.
  const list = pick("max_prediction_proba").filter((s) => s.labels.stat !== "mean");
  return quantileChart("Top-1 probability (median, q25–q75 band)", list, PALETTE[1], { y: { range: [0, 1] } });
}

function accuracyChart() {
  const est = pick("estimated_accuracy");
  const real = pick("accuracy", (l) => l.class_name === undefined);
  const series = [];
  const data = [];
  est.forEach((s) => { series.push({ label: "estimated accuracy", stroke: PALETTE[6], width: 2, dash: [6, 4] }); data.push(s.values); });
  real.forEach((s) => { series.push({ label: "accuracy (labels)", stroke: PALETTE[4], width: 2, points: { show: true, size: 4 } }); data.push(s.values); });
  return { title: "Estimated and real accuracy", series, data, scales: { y: { range: [0, 1] } }, spanGaps: true };
}

// A regression stream has prediction statistics or error metrics instead of classes.
function isRegression() {
  return pick("prediction_value").length > 0 || pick("mae").length > 0;
}

function predictionChart() {
  return quantileChart("Predictions (mean, q25–q75 band)", pick("prediction_value"), PALETTE[5]);
}

function errorChart() {
  const series = [];
  const data = [];
  pick("mae").forEach((s) => { series.push({ label: "MAE", stroke: PALETTE[2], width: 2, points: { show: true, size: 4 } }); data.push(s.values); });
  pick("rmse").forEach((s) => { series.push({ label: "RMSE", stroke: PALETTE[0], width: 2, dash: [6, 4] }); data.push(s.values); });
  return { title: "MAE and RMSE (labels)", series, data, spanGaps: true, empty: "no labels joined yet" };
}

function healthChart() {
  const series = [];
  const data = [];
  [["capture_dropped", "capture drops", PALETTE[2], false], ["decode_errors", "decode errors", PALETTE[1], false],
    ["label_late_count", "late labels", PALETTE[6], false],
    ["capture_dropped", "capture drops (all models)", PALETTE[3], true],
    ["decode_errors", "decode errors (model unknown)", PALETTE[9], true]].forEach(([what, label, color, global]) => {
    const list = pick(what, (l) => (l.scope === "global") === global);
    if (!list.length) return;
    // Several series of one metric (by reason) are summed: the chart shows health.
    const sum = state.data.buckets.map((_, i) => {
      let t = null;
      for (const s of list) if (s.values[i] !== null) t = (t ?? 0) + s.values[i];
      return t;
    });
    series.push({ label, stroke: color, width: 2 });
    data.push(sum);
  });
  return { title: "Capture health (per bucket)", series, data, empty: "no drops, decode errors or late labels recorded" };
}

function featureChart(name, color) {
  return quantileChart(name, pick("feature_value", (l) => l.feat_name === name), color);
}

// ---------- rendering ----------

function fmt(v) {
  if (v == null) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.001 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

function makePlot(id, spec, container, width, height, legend) {
  const opts = {
    width, height,
    series: [{}, ...spec.series.map((s) => ({ spanGaps: spec.spanGaps ?? false, ...s }))],
    bands: spec.bands ?? [],
    scales: { x: { time: true }, ...(spec.scales ?? {}) },
    axes: [{ stroke: "#555", grid: { stroke: "#eee" } }, { stroke: "#555", grid: { stroke: "#eee" }, size: 50, values: (u, vals) => vals.map(fmt) }],
    // Small multiples drop the legend: the card title names the feature.
    legend: { show: legend, live: true },
    cursor: { drag: { x: false, y: false } },
  };
  const plot = new uPlot(opts, [state.data.buckets, ...spec.data], container);
  state.charts.set(id, { plot, spec });
  return plot;
}

function card(title, id, extraClass = "") {
  const body = el("div", { class: "plot" });
  const titleEl = el("h3", {}, title);
  const c = el("section", { class: "card " + extraClass, "data-chart": id }, titleEl, body);
  return { c, body, titleEl };
}

function latestValue(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}

// PSI conventions: below 0.1 stable, 0.1-0.25 moderate, above 0.25 significant;
// green to red through yellow, lighter when stable.
function driftHsl(t) {
  return [120 - 120 * t, 0.7, 0.88 - 0.4 * t];
}

function driftColor(v) {
  if (v === null || v === undefined) return "#f3f3f3";
  const [h, s, l] = driftHsl(Math.max(0, Math.min(1, v / 0.25)));
  return `hsl(${h}, ${s * 100}%, ${l * 100}%)`;
}

function hslToRgb([h, s, l]) {
  const k = (n) => (n + h / 30) % 12;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [Math.round(255 * f(0)), Math.round(255 * f(8)), Math.round(255 * f(4))];
}

// 256 steps of the drift scale, so that painting a cell is a table lookup.
const DRIFT_RGB = Array.from({ length: 256 }, (_, i) => hslToRgb(driftHsl(i / 255)));
const NO_DRIFT_RGB = [0xf3, 0xf3, 0xf3];

function driftSeries() {
  const all = pick("feature_drift");
  const method = driftMethod(all);
  const byFeature = new Map(all.filter((s) => s.labels.method === method).map((s) => [s.labels.feat_name, s]));
  const pred = pick("prediction_drift", (l) => l.method === method)[0];
  return { method, byFeature, pred };
}

function drawStrip(canvas, tooltip) {
  const t0 = performance.now();
  const { method, byFeature, pred } = driftSeries();
  const rows = [];
  if (pred) rows.push(["(predictions)", pred.values]);
  for (const name of [...byFeature.keys()].sort(natural)) rows.push([name, byFeature.get(name).values]);
  const labelW = 130;
  const rowH = rows.length > 40 ? 7 : 14;
  const width = canvas.parentElement.clientWidth || 800;
  const n = state.data.buckets.length;
  const cellW = n ? (width - labelW) / n : 0;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = width * dpr;
  canvas.height = Math.max(rowH * rows.length, rowH) * dpr;
  canvas.style.width = width + "px";
  canvas.style.height = Math.max(rowH * rows.length, rowH) + "px";
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.font = `${Math.min(rowH - 1, 11)}px system-ui, sans-serif`;
  g.textBaseline = "middle";
  g.fillStyle = "#333";
  rows.forEach(([name], r) => {
    g.fillText(name.length > 20 ? name.slice(0, 19) + "…" : name, 2, r * rowH + rowH / 2);
  });
  // One pixel per cell, scaled up without smoothing: ~150k cells paint in a few ms.
  if (n && rows.length) {
    const cells = document.createElement("canvas");
    cells.width = n;
    cells.height = rows.length;
    const cg = cells.getContext("2d");
    const img = cg.createImageData(n, rows.length);
    rows.forEach(([, values], r) => {
      for (let i = 0; i < n; i++) {
        const v = values[i];
        const rgb = v === null || v === undefined ? NO_DRIFT_RGB : DRIFT_RGB[Math.round(255 * Math.max(0, Math.min(1, v / 0.25)))];
        const o = 4 * (r * n + i);
        img.data[o] = rgb[0];
        img.data[o + 1] = rgb[1];
        img.data[o + 2] = rgb[2];
        img.data[o + 3] = 255;
      }
    });
    cg.putImageData(img, 0, 0);
    g.imageSmoothingEnabled = false;
    g.drawImage(cells, 0, 0, n, rows.length, labelW, 0, width - labelW, rows.length * rowH);
  }
  canvas.onmousemove = (e) => {
    const r = Math.floor(e.offsetY / rowH);
    const i = Math.floor((e.offsetX - labelW) / cellW);
    if (!rows[r] || i < 0 || i >= n) { tooltip.textContent = ""; return; }
    const t = new Date(state.data.buckets[i] * 1000).toLocaleString();
    tooltip.textContent = `${rows[r][0]} · ${t} · ${method} ${fmt(rows[r][1][i])}`;
  };
  canvas.onclick = (e) => {
    const r = Math.floor(e.offsetY / rowH);
    const target = rows[r] && document.querySelector(`[data-chart="feature:${CSS.escape(rows[r][0])}"]`);
    target?.scrollIntoView({ behavior: "smooth", block: "center" });
  };
  state.strip = { rows: rows.length, buckets: n, method };
  state.timings.stripMs = performance.now() - t0;
  return { rows: rows.length, method };
}

function shapeOf(data) {
  return [...data.series.keys()].sort().join("\n");
}

function overviewSpecs() {
  const outputs = isRegression()
    ? [["prediction", predictionChart], ["errors", errorChart]]
    : [["classes", classesChart], ["proba", probaChart], ["accuracy", accuracyChart]];
  return [["traffic", trafficChart], ...outputs, ["health", healthChart]];
}

function featureNames() {
  const names = new Set(pick("feature_value").map((s) => s.labels.feat_name));
  return [...names].sort(natural);
}

function render() {
  const t0 = performance.now();
  const main = $("main");
  for (const { plot } of state.charts.values()) plot.destroy();
  state.charts.clear();
  main.replaceChildren();
  if (!state.data || state.data.buckets.length === 0) {
    main.append(el("p", { class: "empty" }, "No buckets in this range yet."));
    return;
  }
  const overview = el("div", { class: "grid overview" });
  main.append(overview);
  // Cards first, then one layout read: every plot of a grid gets its cell's width.
  const overviewPlots = [];
  for (const [id, build] of overviewSpecs()) {
    const spec = build();
    const { c, body } = card(spec.title, id);
    overview.append(c);
    if (spec.series.length === 0) body.append(el("p", { class: "empty" }, spec.empty ?? "no data yet"));
    else overviewPlots.push([id, spec, body]);
  }
  const wide = overviewPlots[0]?.[2].clientWidth || 320;
  for (const [id, spec, body] of overviewPlots) makePlot(id, spec, body, wide, 200, true);
  const { c: stripCard, body: stripBody, titleEl } = card("Drift by feature and bucket", "drift", "wide");
  const canvas = el("canvas");
  const tooltip = el("div", { class: "tooltip" });
  stripBody.append(canvas, tooltip);
  main.append(stripCard);
  const strip = drawStrip(canvas, tooltip);
  titleEl.textContent = strip.method
    ? `Drift by feature and bucket (${strip.method}; green stable, yellow 0.1, red ≥ 0.25)`
    : "Drift by feature and bucket (no drift scores yet)";
  const names = featureNames();
  main.append(el("h2", {}, `Features (${names.length})`));
  const grid = el("div", { class: "grid features" });
  main.append(grid);
  const { byFeature, method } = driftSeries();
  const featurePlots = [];
  names.forEach((name, i) => {
    const id = "feature:" + name;
    const { c, body, titleEl: h } = card(name, id);
    const d = byFeature.get(name);
    if (d) {
      const v = latestValue(d.values);
      h.append(el("span", { class: "badge", style: `background:${driftColor(v)}` }, `${method} ${fmt(v)}`));
    }
    grid.append(c);
    featurePlots.push({ id, name, color: PALETTE[i % 10], card: c, body });
  });
  const width = featurePlots[0]?.body.clientWidth || 260;
  const t1 = performance.now();
  // A hundred features do not fit on a screen: charts are drawn when they come near
  // the viewport, and offscreen ones are only marked stale by live updates
  // (`?eager=1` draws them all at once, e.g. to print the page).
  state.lazy.observer?.disconnect();
  state.lazy = { observer: null, plots: new Map(), visible: new Set(), stale: new Set() };
  const drawFeature = (p) => makePlot(p.id, featureChart(p.name, p.color), p.body, width, 130, false);
  if (new URLSearchParams(location.search).has("eager")) {
    featurePlots.forEach(drawFeature);
  } else {
    const margin = 400;
    const lazy = state.lazy;
    lazy.observer = new IntersectionObserver((entries) => {
      for (const e of entries) {
        const p = lazy.plots.get(e.target.dataset.chart);
        if (!e.isIntersecting) {
          lazy.visible.delete(p.id);
          continue;
        }
        lazy.visible.add(p.id);
        if (!state.charts.has(p.id)) drawFeature(p);
        else if (lazy.stale.delete(p.id)) updateChart(p.id);
      }
    }, { rootMargin: `${margin}px 0px` });
    for (const p of featurePlots) {
      lazy.plots.set(p.id, p);
      const r = p.card.getBoundingClientRect();
      if (r.top < window.innerHeight + margin && r.bottom > -margin) {
        lazy.visible.add(p.id);
        drawFeature(p);
      }
      lazy.observer.observe(p.card);
    }
  }
  state.timings.featurePlotsMs = performance.now() - t1;
  state.shape = shapeOf(state.data);
  afterPaint(() => {
    if (state.firstRenderMs === null) state.firstRenderMs = performance.now();
    state.lastRenderMs = performance.now() - t0;
    document.body.dataset.rendered = "true";
  });
}

// uPlot draws in a microtask after it is fed; a timeout inside an animation frame
// runs once that drawing has been painted, which is what "rendered" means here.
function afterPaint(callback) {
  requestAnimationFrame(() => setTimeout(callback, 0));
}

function updateChart(id) {
  const { plot } = state.charts.get(id);
  const spec = id.startsWith("feature:") ? featureChart(id.slice(8), "#000") : overviewSpecs().find(([k]) => k === id)[1]();
  plot.setData([state.data.buckets, ...spec.data]);
}

// Updates charts in place when the set of series did not change; rebuilds otherwise.
function refresh() {
  if (!state.data || shapeOf(state.data) !== state.shape || state.charts.size === 0) {
    render();
    return;
  }
  const t0 = performance.now();
  for (const id of state.charts.keys()) {
    if (id.startsWith("feature:") && state.lazy.observer && !state.lazy.visible.has(id)) state.lazy.stale.add(id);
    else updateChart(id);
  }
  state.timings.setDataMs = performance.now() - t0;
  const canvas = document.querySelector('[data-chart="drift"] canvas');
  const tooltip = document.querySelector('[data-chart="drift"] .tooltip');
  if (canvas) drawStrip(canvas, tooltip);
  const { byFeature, method } = driftSeries();
  for (const [name, s] of byFeature) {
    const badge = document.querySelector(`[data-chart="feature:${CSS.escape(name)}"] .badge`);
    if (badge) {
      const v = latestValue(s.values);
      badge.textContent = `${method} ${fmt(v)}`;
      badge.style.background = driftColor(v);
    }
  }
  afterPaint(() => { state.lastRenderMs = performance.now() - t0; });
}

function renderHeader() {
  const nav = $("models");
  nav.replaceChildren(...state.models.filter((m) => m.model !== GLOBAL_MODEL).map((m) =>
    el("button", { class: m.model === state.model ? "active" : "", onclick: () => selectModel(m.model) }, m.model)));
  const current = state.models.find((m) => m.model === state.model);
  const select = $("stream");
  const streams = current?.streams ?? [];
  select.hidden = streams.length < 2;
  select.replaceChildren(...streams.map((s, i) =>
    el("option", { value: String(i) }, [s.version && `version ${s.version}`, s.signature].filter(Boolean).join(" · ") || "default")));
  const idx = streams.findIndex((s) => s.version === state.stream?.version && s.signature === state.stream?.signature);
  select.value = String(Math.max(0, idx));
  select.onchange = () => { state.stream = streams[Number(select.value)]; load(); };
  $("ranges").replaceChildren(...RANGES.map(([label, seconds]) =>
    el("button", { class: seconds === state.range ? "active" : "", onclick: () => { state.range = seconds; renderHeader(); load(); } }, label)));
}

function setStatus(text, ok) {
  $("status-text").textContent = text;
  $("status").className = ok ? "ok" : "down";
}

async function loadModels() {
  const { models } = await getJson("/api/models");
  state.models = models;
  if (!state.model || !models.some((m) => m.model === state.model)) {
    const wanted = new URLSearchParams(location.search).get("model");
    const real = models.filter((m) => m.model !== GLOBAL_MODEL);
    state.model = models.find((m) => m.model === wanted)?.model ?? real[0]?.model ?? null;
    state.stream = newestStream(models.find((m) => m.model === state.model));
  }
  renderHeader();
}

// The highest version (numerically: 10 after 9) is what operators look at first.
function newestStream(summary) {
  const streams = [...(summary?.streams ?? [])];
  streams.sort((a, b) => natural(a.version ?? "", b.version ?? "") || natural(a.signature ?? "", b.signature ?? ""));
  return streams.at(-1) ?? null;
}

function selectModel(model) {
  state.model = model;
  state.stream = newestStream(state.models.find((m) => m.model === model));
  renderHeader();
  load();
}

// Serializes loads and live merges so that answers are applied in request order.
function enqueue(task) {
  state.pending = state.pending.then(task).catch((e) => setStatus(String(e.message ?? e), false));
  return state.pending;
}

function load() {
  return enqueue(async () => {
    if (!state.model) return;
    const answers = await fetchSeries(state.model);
    state.data = merge(null, answers);
    render();
  });
}

function onBucket(update) {
  state.lastEvent = update;
  enqueue(async () => {
    if (!state.models.some((m) => m.model === update.model)) await loadModels();
    if (!state.model || (update.model !== state.model && update.model !== GLOBAL_MODEL)) return;
    if (!state.data) {
      state.data = merge(null, await fetchSeries(state.model));
      render();
    } else {
      state.data = merge(state.data, await fetchSeries(state.model, update.buckets[0]));
      refresh();
    }
    // Counted once painted, so that whoever watches the counter sees the new bucket.
    afterPaint(() => {
      state.liveUpdates += 1;
      document.body.dataset.liveUpdates = String(state.liveUpdates);
    });
    setStatus(`live · last bucket ${new Date(update.latest_bucket * 1000).toLocaleTimeString()}`, true);
  });
}

function connect() {
  const events = new EventSource("/api/events");
  events.onopen = () => setStatus("live", true);
  events.addEventListener("bucket", (e) => onBucket(JSON.parse(e.data)));
  events.addEventListener("lagged", () => load());
  // EventSource reconnects by itself; a reload of the data covers what was missed.
  events.onerror = () => {
    setStatus("reconnecting…", false);
    events.addEventListener("open", () => load(), { once: true });
  };
}

let resizeTimer;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(render, 200);
});

enqueue(loadModels).then(load);
connect();
