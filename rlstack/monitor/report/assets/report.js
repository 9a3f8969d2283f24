/* rlstack report / dashboard page. Plain ES2020, no build step; uPlot (vendored) draws the line charts.
 * Input: the JSON payload in <script id="rlstack-data"> (rlstack/monitor/report/data.py describes it) and
 * the options in <script id="rlstack-options"> ({live: null | {refresh_s, data_url}}).
 * Test hook: window.RLSTACK = {data, charts: {panelId: uPlot | {series}}, series(panelId), browse({run, step,
 * sample}), ready, renders}.
 */
(function () {
  "use strict";

  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#65a30d",
    "#4f46e5", "#b45309"];
  const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3], [1, 5]];
  const FLAG_TRAINABLE = 1, FLAG_TOOL = 2, FLAG_ACCEPTED = 4;
  const QUANTILES = ["0.05", "0.25", "0.5", "0.75", "0.95"];
  const FAULTS = /^(reward\/unscored$|reward\/.+_(errors|timeouts)$|(env|episode)\/(tool_errors|tool_timeouts|failed_episodes)$|faults\/)/;
  const NO_MOE = "no MoE layers in this run";
  const INT_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((p) => m * p)).sort((a, b) => a - b);

  const SECTIONS = [
    { id: "training", title: "Training", panels: [
      { id: "reward", title: "Reward (mean)", keys: ["reward/mean"] },
      { id: "eval", title: "Eval accuracy", match: /^eval\/.*accuracy$/,
        empty: "no eval/*accuracy metrics in this run" },
      { id: "length", title: "Response length (mean tokens)", keys: ["response/length_mean"] },
      { id: "entropy", title: "Policy entropy", keys: ["actor/entropy"],
        empty: "actor/entropy is not logged in this run" },
      { id: "grad_norm", title: "Gradient norm", keys: ["actor/grad_norm"] },
      { id: "lr", title: "Learning rate", keys: ["actor/lr"] },
    ] },
    { id: "offpolicy", title: "Off-policy health", panels: [
      { id: "staleness_hist", title: "Staleness of rollouts", kind: "staleness" },
      { id: "staleness", title: "Staleness per step", keys: ["staleness/mean", "staleness/max", "staleness/dropped"] },
      { id: "acceptance", title: "Filter acceptance",
        keys: ["filter/token_accept", "filter/traj_accept", "filter/combined_accept"] },
      { id: "log_ratio_version", title: "Log-ratio (train − rollout) by weights version", kind: "logratio" },
      { id: "log_ratio_step", title: "Log-ratio quantiles per step",
        keys: ["filter/log_ratio_p05", "filter/log_ratio_p50", "filter/log_ratio_p95"] },
      { id: "routing", title: "Routing confidence and mismatch", match: /^moe\/layer\d+\/routing_confidence$/,
        keys: ["moe/routing_mismatch"], empty: NO_MOE },
      { id: "router_entropy", title: "Router entropy", keys: ["moe/router_entropy"], empty: NO_MOE },
      { id: "expert_load", title: "Expert load (tokens per expert)", kind: "heatmap" },
      { id: "faults", title: "Unscored, errors, time-outs, faults", match: FAULTS,
        empty: "no unscored / error / time-out / fault counts in this run" },
    ] },
    { id: "timing", title: "Time and throughput", panels: [
      { id: "time", title: "Time per stage (s)", match: /^time\//, total: "time/step" },
      { id: "throughput", title: "Throughput", match: /^throughput\// },
    ] },
  ];

  const state = { run: 0, step: null, open: null, filter: "all", lrStep: "latest", heatRun: 0, heatLayer: null,
    tokenScale: "auto", options: { live: null }, etag: null, width: 0 };
  const RL = window.RLSTACK = { data: null, charts: {}, series: seriesOf, browse, ready: false, renders: 0, error: null };

  // ---------------------------------------------------------------- helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "style") el.style.cssText = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c == null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function fmt(v, digits = 4) {
    if (v == null || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e7) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(digits)));
  }

  function fmtTime(unix) {
    if (unix == null) return "–";
    const d = new Date(unix * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function clock(unix) {
    return fmtTime(unix).slice(11);
  }

  function natural(a, b) {
    return a.localeCompare(b, undefined, { numeric: true });
  }

  function hexToRgb(hex) {
    const n = parseInt(hex.slice(1), 16);
    return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
  }

  function rgba(hex, alpha) {
    const [r, g, b] = hexToRgb(hex);
    return `rgba(${r},${g},${b},${alpha})`;
  }

  function runColor(i) {
    return PALETTE[i % PALETTE.length];
  }

  function debounce(fn, ms) {
    let t = null;
    return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
  }

  function panelEl(panel) {
    const controls = h("div", { class: "controls" });
    const body = h("div", { class: "body" });
    const note = h("div", { class: "note" });
    const el = h("div", { class: "panel", id: `panel-${panel.id}`, "data-panel": panel.id },
      h("div", { class: "head" }, h("h3", {}, panel.title), controls), body, note);
    return { el, body, controls, note };
  }

  function empty(body, text) {
    body.replaceChildren(h("div", { class: "empty" }, text));
  }

  function select(options, value, onchange, label) {
    const s = h("select", { "aria-label": label || "" });
    for (const [v, text] of options) {
      const o = h("option", { value: String(v) }, text);
      if (String(v) === String(value)) o.selected = true;
      s.append(o);
    }
    s.addEventListener("change", () => onchange(s.value));
    return s;
  }

  function chartWidth(body) {
    return Math.max(280, Math.floor(body.clientWidth || 460));
  }

  // ---------------------------------------------------------------- series and the test hook

  /** The plotted series of a panel: [{label, run, key, x, y}] (x/y as plotted: alignment gaps left out,
   * nulls kept as nulls). */
  function seriesOf(panelId) {
    const chart = RL.charts[panelId];
    if (!chart) return [];
    if (chart.rl) return chart.rl.series;
    return chart.series || [];
  }

  function alignData(series) {
    const xs = [...new Set(series.flatMap((s) => s.x))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const ys = series.map((s) => {
      const y = new Array(xs.length).fill(undefined); // undefined: no point here (spanned); null: a gap
      s.x.forEach((x, i) => { y[index.get(x)] = s.y[i]; });
      return y;
    });
    return [xs, ...ys];
  }

  /** Tick labels with as many decimals as the tick spacing needs (exponents for tiny or huge values). */
  function axisValues(u, splits, axisIdx, space, incr) {
    const mag = (v) => Math.floor(Math.log10(Math.abs(v)));
    const top = Math.max(...splits.map((v) => Math.abs(v)));
    return splits.map((v) => {
      if (v === 0) return "0";
      if (top >= 1e6 || top < 1e-3) return v.toExponential(Math.min(4, Math.max(0, mag(v) - mag(incr || v))));
      return v.toFixed(Math.min(10, Math.max(0, -mag(incr || v))));
    });
  }

  /** The y range: uPlot's padded range, and ±10% (±1 around 0) for a flat series instead of [0, 100]. */
  function yRange(u, min, max) {
    if (min == null || max == null) return [0, 1];
    if (min === max) {
      const d = Math.abs(min) * 0.1 || 1;
      return [min - d, max + d];
    }
    return uPlot.rangeNum(min, max, 0.1, true);
  }

  function lineChart(panelId, body, series, opts = {}) {
    const data = alignData(series);
    const uopts = {
      width: chartWidth(body),
      height: opts.height || 230,
      scales: { x: { time: false }, y: { range: yRange } },
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      axes: [
        { label: opts.xLabel || "step", labelSize: 18, size: 36, incrs: INT_INCRS, values: axisValues },
        { size: 64, values: axisValues },
      ],
      series: [
        { label: opts.xLabel || "step", value: (u, v) => fmt(v) },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: s.width || 1.6,
          dash: s.dash && s.dash.length ? s.dash : undefined,
          spanGaps: false,
          points: { show: s.points != null ? s.points : s.x.length <= 60, size: 5, fill: s.color },
          value: (u, v) => fmt(v),
        })),
      ],
      bands: opts.bands || [],
    };
    const u = new uPlot(uopts, data, body);
    if (data[0].length === 1) u.setScale("x", { min: data[0][0] - 1, max: data[0][0] + 1 }); // uPlot: [0, 2x]
    u.rl = { series: series.map((s) => ({ label: s.label, run: s.run, key: s.key, x: s.x.slice(), y: s.y.slice() })) };
    RL.charts[panelId] = u;
    return u;
  }

  // ---------------------------------------------------------------- metric line panels

  function panelKeys(panel, metrics) {
    const keys = (panel.keys || []).filter((k) => k in metrics);
    if (panel.match) {
      keys.push(...Object.keys(metrics).filter((k) => panel.match.test(k) && !keys.includes(k)).sort(natural));
    }
    return keys;
  }

  function metricPanel(panel, runs, parts) {
    const series = [];
    const lacking = [];
    const multi = runs.length > 1;
    runs.forEach((run, ri) => {
      const keys = panelKeys(panel, run.metrics || {});
      if (!keys.length) lacking.push(run.name);
      keys.forEach((key, ki) => {
        const m = run.metrics[key];
        series.push({
          label: multi ? `${run.name}: ${key}` : key,
          run: run.name, key, x: m.x, y: m.y,
          color: multi ? runColor(ri) : key === panel.total ? "#475467" : runColor(ki),
          dash: multi ? DASHES[ki % DASHES.length] : key === panel.total ? [6, 4] : [],
        });
      });
    });
    if (!series.length) {
      const what = panel.keys ? panel.keys.join(", ") : "matching metrics";
      empty(parts.body, panel.empty || (runs.some((r) => r.metrics && Object.keys(r.metrics).length)
        ? `no ${what} in this run` : "no metrics.jsonl in this run (yet)"));
      RL.charts[panel.id] = { series: [] };
      return;
    }
    lineChart(panel.id, parts.body, series);
    if (multi && lacking.length) parts.note.textContent = `not in ${lacking.join(", ")}`;
  }

  // ---------------------------------------------------------------- staleness histogram

  function stalenessPanel(panel, runs, parts) {
    const have = runs.map((r, i) => [r, i]).filter(([r]) => r.staleness);
    if (!have.length) {
      empty(parts.body, "no samples/rollouts.jsonl and no staleness/hist_* metrics in this run");
      RL.charts[panel.id] = { series: [] };
      return;
    }
    const series = have.map(([r, i]) => {
      const xs = Object.keys(r.staleness.counts).map(Number).sort((a, b) => a - b);
      return { label: r.name, run: r.name, key: "staleness", x: xs, y: xs.map((x) => r.staleness.counts[String(x)]),
        color: runColor(i) };
    });
    RL.charts[panel.id] = { series: series.map(({ color, ...s }) => s) };
    barChart(parts.body, series, "updates behind the learner (staleness)", "rollouts");
    const notes = have.map(([r]) => {
      const src = r.staleness.source === "rollouts" ? "every rollout (samples/rollouts.jsonl)"
        : "kept rollouts (staleness/hist_* metrics)";
      return `${runs.length > 1 ? r.name + ": " : ""}${src}; dropped as too stale: ${fmt(r.staleness.dropped)}`;
    });
    parts.note.textContent = notes.join(" · ");
  }

  function setupCanvas(body, width, height) {
    const dpr = window.devicePixelRatio || 1;
    const canvas = h("canvas", { width: Math.round(width * dpr), height: Math.round(height * dpr),
      style: `width:${width}px;height:${height}px` });
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.font = "12px system-ui, sans-serif";
    return { canvas, ctx };
  }

  function barChart(body, series, xLabel, yLabel) {
    const width = chartWidth(body), height = 230;
    const { canvas, ctx } = setupCanvas(body, width, height);
    const xs = [...new Set(series.flatMap((s) => s.x))].sort((a, b) => a - b);
    const maxY = Math.max(1, ...series.flatMap((s) => s.y));
    const left = 56, right = 10, top = 16, bottom = 40;
    const plotW = width - left - right, plotH = height - top - bottom;
    const groupW = plotW / Math.max(1, xs.length);
    const barW = Math.min(60, (groupW * 0.7) / series.length);
    ctx.strokeStyle = "#d0d5dd";
    ctx.fillStyle = "#667085";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (maxY * i) / 4, y = top + plotH - (plotH * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + plotW, y); ctx.stroke();
      ctx.fillText(fmt(Math.round(v * 10) / 10, 3), left - 6, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    xs.forEach((x, gi) => {
      const cx = left + groupW * (gi + 0.5);
      series.forEach((s, si) => {
        const i = s.x.indexOf(x);
        if (i < 0) return;
        const v = s.y[i], bh = (plotH * v) / maxY;
        const bx = cx - (barW * series.length) / 2 + si * barW;
        ctx.fillStyle = s.color;
        ctx.fillRect(bx + 1, top + plotH - bh, barW - 2, bh);
        ctx.fillStyle = "#344054";
        ctx.textBaseline = "bottom";
        ctx.fillText(String(v), bx + barW / 2, top + plotH - bh - 1);
        ctx.textBaseline = "top";
      });
      ctx.fillStyle = "#667085";
      ctx.fillText(String(x), cx, top + plotH + 4);
    });
    ctx.fillText(xLabel, left + plotW / 2, height - 16);
    ctx.save();
    ctx.translate(12, top + plotH / 2); ctx.rotate(-Math.PI / 2);
    ctx.textBaseline = "middle"; ctx.fillText(yLabel, 0, 0);
    ctx.restore();
    const legend = series.length > 1 ? h("div", { class: "heat-legend" },
      series.map((s) => h("span", {}, h("span", { class: "swatch", style: `background:${s.color}` }), " ", s.label))) : null;
    body.replaceChildren(canvas, legend || "");
  }

  // ---------------------------------------------------------------- log-ratio by weights version

  function logRatioPanel(panel, runs, parts) {
    const have = runs.map((r, i) => [r, i]).filter(([r]) => r.log_ratio && r.log_ratio.length);
    if (!have.length) {
      empty(parts.body, "no log_ratio.jsonl in this run: see the per-step quantiles (filter/log_ratio_p*) below");
      RL.charts[panel.id] = { series: [] };
      return;
    }
    const steps = [...new Set(have.flatMap(([r]) => r.log_ratio.map((e) => e.step)))].sort((a, b) => a - b);
    if (state.lrStep !== "all" && state.lrStep !== "latest" && !steps.includes(Number(state.lrStep))) state.lrStep = "latest";
    const options = [["latest", "latest step"], ["all", "all steps"], ...steps.slice().reverse().map((s) => [s, `step ${s}`])];
    parts.controls.replaceChildren(select(options, state.lrStep, (v) => { state.lrStep = v; redrawPanel(panel.id); }, "step"));
    const multi = have.length > 1;
    const series = [], bands = [];
    for (const [run, ri] of have) {
      const entries = state.lrStep === "all" ? run.log_ratio
        : [state.lrStep === "latest" ? run.log_ratio[run.log_ratio.length - 1]
          : run.log_ratio.find((e) => e.step === Number(state.lrStep))].filter(Boolean);
      const merged = mergeQuantiles(entries);
      const versions = Object.keys(merged).map(Number).sort((a, b) => a - b);
      if (!versions.length) continue;
      const color = runColor(ri);
      const base = series.length + 1;
      QUANTILES.forEach((q, qi) => {
        series.push({
          label: `${multi ? run.name + ": " : ""}q${q}`, run: run.name, key: `q${q}`, x: versions,
          y: versions.map((v) => merged[v][q]), color: q === "0.5" ? color : rgba(color, 0.55),
          width: q === "0.5" ? 2 : 1, dash: q === "0.5" ? [] : [4, 3], points: q === "0.5" || versions.length <= 40,
        });
      });
      bands.push({ series: [base + 4, base], fill: rgba(color, 0.08) }, { series: [base + 3, base + 1], fill: rgba(color, 0.16) });
    }
    if (!series.length) {
      empty(parts.body, `no log-ratio records at step ${state.lrStep}`);
      RL.charts[panel.id] = { series: [] };
      return;
    }
    lineChart(panel.id, parts.body, series, { xLabel: "weights version", bands });
    parts.note.textContent = (state.lrStep === "all"
      ? "all steps: each version's quantiles averaged over the steps, weighted by tokens. " : "") +
      "Bands: 5–95% and 25–75% of the trainable tokens' log-ratios; line: median.";
  }

  function mergeQuantiles(entries) {
    const acc = {};
    for (const e of entries) {
      for (const [v, s] of Object.entries(e.by_version || {})) {
        const a = acc[v] || (acc[v] = { n: 0, sums: {} });
        const n = s.tokens || 1;
        a.n += n;
        for (const q of QUANTILES) if (s.q && s.q[q] != null) a.sums[q] = (a.sums[q] || 0) + n * s.q[q];
      }
    }
    const out = {};
    for (const [v, a] of Object.entries(acc)) {
      out[v] = {};
      for (const q of QUANTILES) out[v][q] = a.sums[q] != null ? a.sums[q] / a.n : null;
    }
    return out;
  }

  // ---------------------------------------------------------------- expert-load heat map

  const HEAT = [[255, 255, 255], [254, 235, 200], [253, 174, 97], [230, 85, 13], [127, 39, 4]];

  function heatColor(t) {
    t = Math.max(0, Math.min(1, t)) * (HEAT.length - 1);
    const i = Math.min(HEAT.length - 2, Math.floor(t)), f = t - i;
    const c = HEAT[i].map((a, k) => Math.round(a + f * (HEAT[i + 1][k] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function heatmapPanel(panel, runs, parts) {
    const have = runs.map((r, i) => [r, i]).filter(([r]) => r.expert_load && Object.keys(r.expert_load.layers).length);
    if (!have.length) {
      empty(parts.body, `${NO_MOE} (no expert_load.jsonl)`);
      RL.charts[panel.id] = { series: [] };
      return;
    }
    if (!have.some(([, i]) => i === state.heatRun)) state.heatRun = have[0][1];
    const run = runs[state.heatRun], load = run.expert_load;
    const layers = Object.keys(load.layers);
    if (!layers.includes(state.heatLayer)) state.heatLayer = layers[0];
    const controls = [];
    if (have.length > 1) {
      controls.push(select(have.map(([r, i]) => [i, r.name]), state.heatRun,
        (v) => { state.heatRun = Number(v); redrawPanel(panel.id); }, "run"));
    }
    controls.push("layer", select(layers.map((l) => [l, l]), state.heatLayer,
      (v) => { state.heatLayer = v; redrawPanel(panel.id); }, "layer"));
    parts.controls.replaceChildren(...controls);
    const rows = load.layers[state.heatLayer]; // per step: tokens per expert
    const experts = Math.max(0, ...rows.map((r) => r.length));
    const z = Array.from({ length: experts }, (_, e) => rows.map((r) => (r[e] == null ? null : r[e])));
    RL.charts[panel.id] = { series: [{ label: `${run.name}: layer ${state.heatLayer}`, run: run.name,
      key: `layer ${state.heatLayer}`, layer: state.heatLayer, x: load.steps.slice(), experts, z }] };

    const width = chartWidth(parts.body);
    const left = 52, top = 6, bottom = 30, right = 8;
    const cellH = Math.max(4, Math.min(22, Math.floor(260 / Math.max(1, experts))));
    const height = top + bottom + cellH * experts;
    const plotW = width - left - right, cellW = plotW / Math.max(1, load.steps.length);
    const { canvas, ctx } = setupCanvas(parts.body, width, height);
    const totals = rows.map((r) => r.reduce((a, b) => a + (b || 0), 0));
    for (let s = 0; s < load.steps.length; s++) {
      const uniform = totals[s] / Math.max(1, rows[s].length);
      for (let e = 0; e < experts; e++) {
        const v = rows[s][e];
        ctx.fillStyle = v == null ? "#eceff3" : heatColor(uniform > 0 ? v / uniform / 3 : 0);
        ctx.fillRect(left + s * cellW, top + e * cellH, Math.ceil(cellW), cellH);
      }
    }
    ctx.fillStyle = "#667085";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    const every = Math.ceil(12 / cellH);
    for (let e = 0; e < experts; e += every) ctx.fillText(`e${e}`, left - 5, top + e * cellH + cellH / 2);
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const stepEvery = Math.max(1, Math.ceil(40 / cellW));
    load.steps.forEach((s, i) => { if (i % stepEvery === 0) ctx.fillText(String(s), left + (i + 0.5) * cellW, top + experts * cellH + 4); });
    ctx.fillText("step", left + plotW / 2, height - 12);
    const hover = h("div", { class: "hover-line" }, "hover a cell: expert, step, tokens");
    canvas.addEventListener("mousemove", (ev) => {
      const rect = canvas.getBoundingClientRect();
      const s = Math.floor((ev.clientX - rect.left - left) / cellW), e = Math.floor((ev.clientY - rect.top - top) / cellH);
      if (s < 0 || e < 0 || s >= load.steps.length || e >= experts) return;
      const v = rows[s][e], uniform = totals[s] / Math.max(1, rows[s].length);
      hover.textContent = `layer ${state.heatLayer}, expert ${e}, step ${load.steps[s]}: ${fmt(v)} tokens` +
        (uniform > 0 && v != null ? ` (${fmt(v / uniform, 3)}× uniform)` : "");
    });
    const gradient = `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(heatColor).join(",")})`;
    const legend = h("div", { class: "heat-legend" }, "0", h("span", { class: "gradient", style: `background:${gradient}` }),
      "≥ 3× uniform share (1× = tokens / experts) · rows: experts, columns: steps");
    parts.body.replaceChildren(canvas, hover, legend);
  }

  // ---------------------------------------------------------------- header

  function header(data) {
    const runs = data.runs;
    const lastStep = Math.max(-1, ...runs.map((r) => (r.steps_done == null ? -1 : r.steps_done)));
    const live = state.options.live;
    const status = live ? h("span", { class: "live-status", id: "live-status" },
      `live: last step ${lastStep < 0 ? "–" : lastStep}, updated ${clock(data.generated)}`) : null;
    const nav = h("nav", {}, SECTIONS.map((s) => h("a", { href: `#sec-${s.id}` }, s.title)),
      h("a", { href: "#sec-browser" }, "Rollouts"));
    const title = live ? "rlstack dashboard" : "rlstack report";
    const cards = runs.map((run, i) => {
      const cfg = run.config;
      const facts = [];
      if (cfg) for (const [k, v] of cfg.summary) facts.push(h("span", { class: "chip" }, h("b", {}, k), String(v)));
      const planned = cfg && cfg.summary.find(([k]) => k === "steps");
      facts.push(h("span", { class: "chip" }, h("b", {}, "steps done"),
        `${run.steps_done == null ? "–" : run.steps_done}${planned ? " / " + planned[1] : ""}`));
      facts.push(h("span", { class: "chip" }, h("b", {}, "last update"), fmtTime(run.last_update)));
      return h("div", { class: "run-card", "data-run": run.name },
        h("div", { class: "name" }, h("span", { class: "swatch", style: `background:${runColor(i)}` }), run.name),
        h("div", { class: "path" }, run.path),
        h("div", { class: "facts" }, facts),
        cfg ? h("details", {}, h("summary", {}, "config.resolved.yaml"), h("pre", {}, cfg.text))
          : h("div", { class: "note" }, "no config.resolved.yaml in this run"));
    });
    const warnings = runs.flatMap((r) => r.warnings.map((w) => (runs.length > 1 ? `${r.name}: ${w}` : w)));
    const parts = [h("div", { class: "top" }, h("h1", {}, `${title}: ${runs.map((r) => r.name).join(", ")}`), status, nav),
      h("div", { class: "runs" }, cards)];
    if (data.error) {
      parts.push(h("div", { class: "warnings error", id: "errors" }, h("b", {}, "The run directories could not be read again: "),
        data.error, " (showing the last data read)"));
    }
    if (warnings.length) {
      parts.push(h("div", { class: "warnings", id: "warnings" }, h("b", {}, "Warnings"), h("ul", {}, warnings.map((w) => h("li", {}, w)))));
    }
    return h("header", {}, parts);
  }

  // ---------------------------------------------------------------- rollout browser

  function decision(r) {
    if (r.dropped) return ["dropped", `dropped: ${r.dropped}`];
    if (r.reward === null && "reward" in r) return ["unscored", `unscored${r.unscored_reason ? ": " + r.unscored_reason : ""}`];
    if (r.traj_accepted) return ["ok", "accepted"];
    if (r.traj_accepted === false) return ["rejected", "rejected by the trajectory filter"];
    return ["", "–"];
  }

  function browserRows(run, step) {
    const recs = (run.rollouts && run.rollouts[step]) || [];
    const toks = (run.tokens && run.tokens[step]) || {};
    if (recs.length) return recs.map((r) => ({ ...r, tokens: toks[String(r.sample)] || null }));
    return Object.entries(toks).map(([s, t]) => ({ step: Number(step), sample: Number(s), prompt_id: t.prompt_id,
      reward: t.reward, staleness: t.staleness, traj_accepted: t.traj_accepted, tokens: t }));
  }

  function browser(data) {
    const runs = data.runs;
    const section = h("section", { id: "sec-browser" }, h("h2", {}, "Rollout browser"));
    const box = h("div", { class: "browser", id: "rollout-browser" });
    section.append(box);
    if (state.run >= runs.length) state.run = 0;
    const run = runs[state.run];
    const steps = [...new Set([...Object.keys(run.rollouts || {}), ...Object.keys(run.tokens || {})])].map(Number).sort((a, b) => a - b);
    const controls = h("div", { class: "controls" });
    if (runs.length > 1) {
      controls.append(h("label", {}, "run ", select(runs.map((r, i) => [i, r.name]), state.run, (v) => {
        state.run = Number(v); state.open = null; redrawBrowser();
      }, "run")));
    }
    box.append(controls);
    if (!steps.length) {
      box.append(h("div", { class: "empty" }, "no samples/rollouts.jsonl and no samples/tokens/ in this run"));
      return section;
    }
    if (state.step == null || !steps.includes(Number(state.step))) { state.step = steps[steps.length - 1]; state.open = null; }
    const withTokens = new Set(Object.keys(run.tokens || {}).map(Number));
    controls.append(h("label", {}, "step ", select(steps.map((s) => [s, withTokens.has(s) ? `${s} (tokens)` : String(s)]),
      state.step, (v) => { state.step = Number(v); state.open = null; redrawBrowser(); }, "step")));
    controls.append(h("label", {}, "show ", select([["all", "all"], ["trained", "trained"], ["not", "not trained"],
      ["tokens", "with per-token data"]], state.filter, (v) => { state.filter = v; redrawBrowser(); }, "filter")));
    controls.append(h("label", {}, "colour scale ", select([["auto", "auto"], ["0.01", "±0.01"], ["0.1", "±0.1"], ["1", "±1"]],
      state.tokenScale, (v) => { state.tokenScale = v; redrawBrowser(); }, "colour scale")));
    let rows = browserRows(run, String(state.step));
    const counts = `${rows.length} rollouts, ${rows.filter((r) => r.tokens).length} with per-token data`;
    rows = rows.filter((r) => state.filter === "all" || (state.filter === "trained" && decision(r)[0] === "ok") ||
      (state.filter === "not" && decision(r)[0] !== "ok") || (state.filter === "tokens" && r.tokens));
    controls.append(h("span", { class: "note" }, counts));
    const table = h("table", { class: "rollouts" }, h("thead", {}, h("tr", {},
      ["#", "prompt id", "reward", "staleness", "version", "decision", "finish", "tokens", "reward info"].map((c) => h("th", {}, c)))));
    const tbody = h("tbody", {});
    for (const r of rows) {
      const [cls, text] = decision(r);
      const open = state.open === r.sample;
      const tr = h("tr", { class: `row${open ? " open" : ""}`, "data-sample": r.sample, onclick: () => {
        state.open = open ? null : r.sample; redrawBrowser();
      } },
      h("td", { class: "num" }, r.sample), h("td", {}, r.prompt_id || "–"), h("td", { class: "num" }, fmt(r.reward)),
      h("td", { class: "num" }, fmt(r.staleness)), h("td", { class: "num" }, fmt(r.version)),
      h("td", {}, h("span", { class: `decision ${cls}` }, text)), h("td", {}, r.finish_reason || "–"),
      h("td", {}, r.tokens ? `${r.tokens.ids.length}` : "–"),
      h("td", { class: "info", title: r.reward_info ? JSON.stringify(r.reward_info) : "" },
        r.reward_info ? JSON.stringify(r.reward_info) : r.episode ? JSON.stringify(r.episode) : ""));
      tbody.append(tr);
      if (open) tbody.append(h("tr", { class: "detail-row" }, h("td", { colspan: 9 }, detail(r))));
    }
    table.append(tbody);
    box.append(rows.length ? table : h("div", { class: "empty" }, "no rollouts match"));
    return section;
  }

  /** Expand a trajectory in the rollout browser: the one given, else the newest with per-token data among
   * those matching (a tool turn preferred); returns {run, step, sample} or null. */
  function browse(opts = {}) {
    const { run = null, step = null, sample = null } = opts || {};
    let pick = null;
    if (run != null && step != null && sample != null) {
      pick = { run, step, sample };
    } else {
      const found = [];
      RL.data.runs.forEach((r, ri) => {
        if (run != null && ri !== run) return;
        for (const [s, trajs] of Object.entries(r.tokens || {})) {
          if (step != null && Number(s) !== step) continue;
          for (const [k, t] of Object.entries(trajs)) {
            if (sample != null && Number(k) !== sample) continue;
            found.push({ run: ri, step: Number(s), sample: Number(k), tool: t.flags.some((f) => f & FLAG_TOOL) ? 1 : 0 });
          }
        }
      });
      if (!found.length) return null;
      found.sort((a, b) => b.tool - a.tool || b.step - a.step || a.run - b.run || a.sample - b.sample);
      pick = found[0];
    }
    Object.assign(state, { run: pick.run, step: pick.step, open: pick.sample, filter: "all" });
    redrawBrowser();
    return { run: pick.run, step: pick.step, sample: pick.sample };
  }

  function detail(r) {
    const el = h("div", { class: "detail", "data-sample": r.sample });
    const prompt = r.prompt ?? (RL.data.runs[state.run].prompts || {})[r.prompt_id];
    if (prompt != null) el.append(h("div", { class: "label" }, "prompt"), h("div", { class: "text" }, prompt));
    if (r.reward_info) el.append(h("div", { class: "label" }, "reward info"), h("div", { class: "text" }, JSON.stringify(r.reward_info, null, 1)));
    if (r.episode) el.append(h("div", { class: "label" }, "episode"), h("div", { class: "text" }, JSON.stringify(r.episode)));
    if (r.tokens) {
      el.append(h("div", { class: "label" }, "response tokens (coloured by train − rollout log-prob)"), tokenView(r.tokens));
    } else {
      el.append(h("div", { class: "label" }, "response"), h("div", { class: "text" }, r.response ?? "–"),
        h("div", { class: "note" }, "no per-token data for this trajectory (samples/tokens/ keeps a bounded sample per step)"));
    }
    return el;
  }

  function niceLimit(x) {
    if (!(x > 0)) return 1e-3;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 5, 10]) if (x <= m * p) return Math.max(1e-4, m * p);
    return 10 * p;
  }

  function divergingColor(t) {
    t = Math.max(-1, Math.min(1, t));
    const end = t < 0 ? [37, 99, 235] : [220, 38, 38];
    const a = Math.abs(t) * 0.75;
    const c = end.map((e) => Math.round(255 + a * (e - 255)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function tokenView(t) {
    const n = t.ids.length;
    const lr = t.ids.map((_, i) => ((t.flags[i] & FLAG_TOOL) ? null : t.log_ratio[i] ?? null));
    const finite = lr.filter((v) => v != null);
    const limit = state.tokenScale === "auto" ? niceLimit(Math.max(0, ...finite.map(Math.abs))) : Number(state.tokenScale);
    const wrap = h("div", { class: "tokens" });
    let block = null;
    let rejected = 0, tool = 0, trainable = 0;
    for (let i = 0; i < n; i++) {
      const f = t.flags[i];
      const text = (t.text[i] ?? "").replace(/\n/g, "↵\n") || "∅";
      const info = [`id ${t.ids[i]}`, `rollout logp ${fmt(t.rollout_logp[i])}`, `train logp ${fmt(lr[i] == null ? null : t.rollout_logp[i] + lr[i])}`,
        `log-ratio ${fmt(lr[i])}`, `version ${fmt(t.version[i])}`, `advantage ${fmt(t.advantage[i])}`];
      if (f & FLAG_TOOL) {
        tool++;
        if (!block) {
          block = h("span", { class: "tool-turn" }, h("span", { class: "tool-label" }, "tool turn (environment output, not policy tokens)"));
          wrap.append(block);
        }
        block.append(h("span", { class: "tok tool", title: ["tool output", ...info].join(" · ") }, text));
        continue;
      }
      block = null;
      const cls = ["tok"];
      const notes = [];
      let bg = "#eceff3";
      if (f & FLAG_TRAINABLE) {
        trainable++;
        bg = lr[i] == null ? "#eceff3" : divergingColor(lr[i] / limit);
        if (!(f & FLAG_ACCEPTED)) { cls.push("rejected"); notes.push("rejected by the token filter"); rejected++; }
      } else {
        cls.push("untrained"); notes.push("not in the loss");
      }
      wrap.append(h("span", { class: cls.join(" "), style: `background-color:${bg}`, title: [...info, ...notes].join(" · ") }, text));
    }
    const mean = finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : null;
    const stats = h("div", { class: "tok-stats" }, `${n} tokens: ${trainable} in the loss, ${rejected} rejected by the token filter, ` +
      `${tool} tool tokens; log-ratio mean ${fmt(mean)}, max |·| ${fmt(finite.length ? Math.max(...finite.map(Math.abs)) : null)}`);
    const gradient = `linear-gradient(to right, ${divergingColor(-1)}, #fff, ${divergingColor(1)})`;
    const legend = h("div", { class: "lr-legend" }, `−${fmt(limit)}`, h("span", { class: "gradient", style: `background:${gradient}` }),
      `+${fmt(limit)}`, " log-ratio (blue: learner less likely than the sampler, red: more likely) · ",
      h("span", { class: "legend-box legend-rejected" }), " rejected by the token filter · ",
      h("span", { class: "legend-box", style: "background:#eceff3" }), " not in the loss · ",
      h("span", { class: "legend-box", style: "background:#f5f0ff;border-left:3px solid #7c3aed" }), " tool turn");
    return h("div", {}, stats, wrap, legend);
  }

  // ---------------------------------------------------------------- page

  const PANELS = Object.fromEntries(SECTIONS.flatMap((s) => s.panels).map((p) => [p.id, p]));
  const DRAW = { staleness: stalenessPanel, logratio: logRatioPanel, heatmap: heatmapPanel };
  const panelParts = {};

  function drawPanel(panel) {
    const parts = panelParts[panel.id];
    const old = RL.charts[panel.id];
    if (old && typeof old.destroy === "function") old.destroy();
    delete RL.charts[panel.id];
    parts.body.replaceChildren();
    parts.controls.replaceChildren();
    parts.note.textContent = "";
    try {
      (DRAW[panel.kind] || metricPanel)(panel, RL.data.runs, parts);
    } catch (e) {
      console.error(`panel ${panel.id}:`, e);
      empty(parts.body, `this panel failed: ${e.message}`);
      RL.charts[panel.id] = { series: [], error: String(e) };
    }
  }

  function redrawPanel(id) {
    drawPanel(PANELS[id]);
  }

  function redrawBrowser() {
    const old = document.getElementById("sec-browser");
    const fresh = browser(RL.data);
    if (old) old.replaceWith(fresh);
    else document.getElementById("app").append(fresh);
  }

  function render(data) {
    const app = document.getElementById("app");
    app.style.minHeight = `${app.offsetHeight}px`; // no scroll jump while the page is rebuilt
    for (const c of Object.values(RL.charts)) if (c && typeof c.destroy === "function") c.destroy();
    RL.charts = {};
    RL.data = data;
    app.replaceChildren(header(data));
    for (const section of SECTIONS) {
      const grid = h("div", { class: "grid" });
      app.append(h("section", { id: `sec-${section.id}` }, h("h2", {}, section.title), grid));
      for (const panel of section.panels) {
        const parts = panelParts[panel.id] = panelEl(panel);
        grid.append(parts.el);
        drawPanel(panel);
      }
    }
    app.append(browser(data));
    app.style.minHeight = "";
    state.width = window.innerWidth;
    RL.renders += 1;
    RL.ready = true;
  }

  async function poll() {
    const live = state.options.live;
    let ok = true;
    try {
      const headers = state.etag ? { "If-None-Match": state.etag } : {};
      const resp = await fetch(live.data_url, { cache: "no-store", headers });
      if (resp.status === 200) {
        state.etag = resp.headers.get("ETag");
        const data = await resp.json();
        if (data.signature !== RL.data.signature || data.error !== RL.data.error) render(data);
      } else if (resp.status !== 304) {
        throw new Error(`HTTP ${resp.status}`);
      }
    } catch (e) {
      ok = false;
      const el = document.getElementById("live-status");
      if (el) { el.classList.add("stale"); el.textContent = `live: connection lost (${e.message}); retrying`; }
    }
    if (ok) {
      const el = document.getElementById("live-status");
      if (el && el.classList.contains("stale")) render(RL.data);
    }
    setTimeout(poll, live.refresh_s * 1000);
  }

  function main() {
    try {
      state.options = JSON.parse(document.getElementById("rlstack-options").textContent);
      const data = JSON.parse(document.getElementById("rlstack-data").textContent);
      state.etag = `"${data.signature}"`;
      render(data);
    } catch (e) {
      RL.error = String(e);
      document.getElementById("app").replaceChildren(h("div", { class: "warnings error" }, `The report failed to load: ${e}`));
      throw e;
    }
    window.addEventListener("resize", debounce(() => {
      if (window.innerWidth !== state.width) render(RL.data);
    }, 200));
    if (state.options.live) setTimeout(poll, state.options.live.refresh_s * 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
