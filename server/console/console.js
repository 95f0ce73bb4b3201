// dtype-serve console: every figure on the page comes from the public HTTP API, called with the key
// the user entered (kept in sessionStorage). No library, no build step, nothing from another origin.
"use strict";

const KEY_STORAGE = "dtype-serve-api-key";
const COLORS = ["#2f6fde", "#e07b24", "#2a9d5b", "#b63dbf", "#c9a100", "#d0433d", "#3fa8b8", "#7a5cd6"];
const state = { key: sessionStorage.getItem(KEY_STORAGE) || "", models: null, view: "memory", timers: {},
  live: null, lastTtft: {}, loads: new Map(), controller: null, chat: [], report: null };

const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 2 : i ? 1 : 0)} ${units[i]}`;
}
const fixed = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(d));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const byDtype = (o) => Object.entries(o || {}).map(([d, n]) => `${d} ${bytes(n)}`).join(", ");

// ---- the API: one helper that sends the key and turns error bodies into messages
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
function headers(json) {
  const h = {};
  if (state.key) h.authorization = `Bearer ${state.key}`;
  if (json) h["content-type"] = "application/json";
  return h;
}
async function raise(r) {
  let message = r.statusText;
  try { message = (await r.json()).error.message; } catch { /* not our JSON error shape */ }
  if (r.status === 401) askForKey(state.key ? "the key was refused" : "");
  throw new ApiError(r.status, `${r.status}: ${message}`);
}
async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!r.ok) await raise(r);
  const type = r.headers.get("content-type") || "";
  return { status: r.status, data: type.includes("json") ? await r.json() : await r.text() };
}
function showError(e) {
  const banner = $("#banner");
  banner.textContent = e instanceof Error ? e.message : String(e);
  banner.hidden = false;
  clearTimeout(state.timers.banner);
  state.timers.banner = setTimeout(() => { banner.hidden = true; }, 8000);
}

// ---- the key
function askForKey(message) {
  $("#key-form").hidden = false;
  $("#key-error").textContent = message;
  $("main").hidden = true;
}
$("#key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.key = $("#key-input").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  await start();
});

// ---- views
function show(view) {
  state.view = view;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  clearInterval(state.timers.poll);
  const refresh = { memory: refreshMemory, live: refreshLive }[view];
  if (refresh) {
    refresh().catch(showError);
    state.timers.poll = setInterval(() => refresh().catch(showError), 2000);
  }
}
for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));

function fillSelect(select, values, selected) {
  const keep = select.value;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  select.value = values.includes(keep) ? keep : selected ?? values[0];
}

// ---- memory: resident variants, the budget, loads and estimates
async function refreshMemory() {
  const memory = (await api("GET", "/memory")).data;
  const budget = memory.budget;
  const pinned = new Set((budget.pinned || []).map((p) => `${p.model}:${p.dtype}`));
  const bar = $("#budget-bar");
  const segments = [];
  memory.variants.forEach((v, i) => {
    segments.push([`${v.model}:${v.dtype} weights`, v.total_bytes, COLORS[i % COLORS.length]]);
    if (v.prompt_cache && v.prompt_cache.bytes) segments.push([`${v.model}:${v.dtype} prompt cache`, v.prompt_cache.bytes, "#9aa3b5"]);
  });
  bar.replaceChildren(...segments.map(([label, n, color]) => {
    const seg = el("div", { title: `${label}: ${bytes(n)}` });
    seg.style.width = `${(100 * n) / budget.budget_bytes}%`;
    seg.style.background = color;
    return seg;
  }));
  bar.setAttribute("aria-label", `${bytes(budget.used_bytes)} of ${bytes(budget.budget_bytes)} used`);
  $("#budget-legend").replaceChildren(...segments.map(([label, n, color]) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = color;
    return el("li", {}, swatch, `${label} ${bytes(n)}`);
  }));
  $("#budget-text").textContent = `${bytes(budget.used_bytes)} used of ${bytes(budget.budget_bytes)} ` +
    `(${pct(budget.used_bytes / budget.budget_bytes)}), ${bytes(budget.free_bytes)} free; MLX active ` +
    `${bytes(memory.process.active_bytes)}, peak ${bytes(memory.process.peak_bytes)}, cache ${bytes(memory.process.cache_bytes)}`;
  const kv = (v) => v.kv_cache_bytes ?? (v.kv_cache && v.kv_cache.bytes);
  const hasKv = memory.variants.some((v) => kv(v) !== undefined);
  $("#kv-head").hidden = !hasKv;
  $("#resident tbody").replaceChildren(...memory.variants.map((v) => {
    const id = `${v.model}:${v.dtype}`;
    const unload = el("button", { type: "button", class: "small", disabled: pinned.has(id),
      title: pinned.has(id) ? "the default variant is pinned" : "", onclick: () => unloadVariant(v.model, v.dtype) }, "Unload");
    return el("tr", { "data-variant": id },
      el("td", {}, v.model), el("td", {}, v.dtype), el("td", {}, byDtype(v.bytes_by_dtype)),
      el("td", { class: "num" }, bytes(v.prompt_cache ? v.prompt_cache.bytes : null)),
      ...(hasKv ? [el("td", { class: "num" }, bytes(kv(v)))] : []),
      el("td", { class: "num" }, bytes(v.total_bytes)), el("td", { class: "num" }, v.in_flight),
      el("td", {}, `${v.loaded_from} in ${fixed(v.load_seconds, 2)} s`), el("td", {}, unload));
  }));
  const device = memory.device;
  $("#device").textContent = `${device.name} · ${device.backend}${device.blas ? ` · ${device.blas.vendor}` : ""}`;
  if (!$("#estimates tbody").children.length) await refreshEstimates();
  else markFits(budget.free_bytes);
}
async function refreshEstimates() {
  const model = $("#load-model").value;
  const { estimates } = (await api("GET", `/memory/estimate?model=${encodeURIComponent(model)}&include_quantized=true`)).data;
  $("#estimates tbody").replaceChildren(...estimates.map((e) => el("tr", { "data-bytes": e.total_bytes },
    el("td", {}, e.dtype), el("td", {}, byDtype(e.bytes_by_dtype)), el("td", { class: "num" }, bytes(e.total_bytes)),
    el("td", { class: "fits" }, ""),
    el("td", {}, el("button", { type: "button", class: "small", onclick: () => loadVariant(e.model, e.dtype) }, "Load")))));
  const budget = (await api("GET", "/models")).data.budget;
  markFits(budget.free_bytes);
}
function markFits(free) {
  for (const row of $("#estimates tbody").children) {
    $(".fits", row).textContent = Number(row.dataset.bytes) <= free ? "yes" : "no (evicts idle variants or is refused)";
  }
}
function renderLoads() {
  const p = state.loadProgress;  // /health's `loading`: the load the worker runs now
  $("#loads").replaceChildren(...[...state.loads.entries()].map(([id, began]) => {
    const mine = p && `${p.model}:${p.dtype}` === id && p.bytes > 0;
    const bar = mine ? el("progress", { value: p.bytes_done, max: p.bytes }) : el("progress", {});
    const done = mine ? `, ${p.tensors_done}/${p.tensors} tensors, ${bytes(p.bytes_done)} of ${bytes(p.bytes)}` : "";
    return el("li", {}, bar, ` loading ${id} … ${((performance.now() - began) / 1000).toFixed(1)} s${done}`);
  }));
}
async function pollLoadProgress() {
  try {
    state.loadProgress = (await api("GET", "/health")).data.loading || null;
  } catch { state.loadProgress = null; }
  renderLoads();
}
async function loadVariant(model, dtype) {
  const id = `${model}:${dtype}`;
  state.loads.set(id, performance.now());
  renderLoads();
  const tick = setInterval(pollLoadProgress, 250);
  try {
    const { data } = await api("POST", "/models/load", { model, dtype });
    showNote(`loaded ${data.model ?? model}:${data.dtype ?? dtype}`);
  } catch (e) { showError(e); } finally {
    clearInterval(tick);
    state.loads.delete(id);
    renderLoads();
    await refreshMemory().catch(showError);
  }
}
async function unloadVariant(model, dtype) {
  try {
    const { data } = await api("DELETE", `/models/${model.split("/").map(encodeURIComponent).join("/")}/${encodeURIComponent(dtype)}`);
    showNote(`unloaded ${model}:${dtype}${data.freed_bytes !== undefined ? `, ${bytes(data.freed_bytes)} freed` : ""}`);
  } catch (e) { showError(e); }
  await refreshMemory().catch(showError);
}
// the outcome of the page's own loads and unloads, newest first, the last five
function showNote(text) {
  const notes = $("#load-notes");
  notes.prepend(el("li", { class: "muted" }, text));
  while (notes.children.length > 5) notes.lastChild.remove();
}
$("#load-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadVariant($("#load-model").value, $("#load-dtype").value);
});
$("#load-model").addEventListener("change", () => refreshEstimates().catch(showError));

// ---- the dtype report: a job polled until done, then a chart and a table
const METRICS = [
  ["top1_agreement", "top-1 agreement", (x) => pct(x)],
  ["kl_mean", "KL mean (nats)", (x) => fixed(x, 5)],
  ["kl_max", "KL max (nats)", (x) => fixed(x, 5)],
  ["task_accuracy", "task accuracy", (x) => pct(x)],
  ["total_bytes", "bytes", (x) => bytes(x)],
  ["bits_per_weight", "bits per weight", (x) => fixed(x, 2)],
  ["decode_tok_s", "decode tokens/s", (x) => fixed(x, 1)],
  ["decode_batch_tok_s", "batched decode tokens/s", (x) => fixed(x, 1)],
  ["prefill_tok_s", "prefill tokens/s", (x) => fixed(x, 1)],
];
function reportQuery() {
  const q = new URLSearchParams({ model: $("#report-model").value });
  for (const box of document.querySelectorAll("#report-dtypes input:checked")) q.append("dtypes", box.value);
  return q;
}
$("#report-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const button = $("#report-form button");
  button.disabled = true;
  $("#report-progress").hidden = false;
  try {
    for (;;) {
      const { status, data } = await api("GET", `/v1/dtypes/report?${reportQuery()}`);
      $("#report-bar").value = data.progress;
      $("#report-stage").textContent = `${pct(data.progress)} · ${data.stage}`;
      if (status === 200) {
        if (data.state === "failed") throw new Error(`the report failed: ${data.error}`);
        renderReport(data.result);
        break;
      }
      await new Promise((r) => setTimeout(r, 1000));  // the server's Retry-After
    }
  } catch (e) { showError(e); } finally { button.disabled = false; }
});
$("#report-metric").addEventListener("change", () => state.report && drawChart(state.report));
function renderReport(result) {
  state.report = result;
  $("#report-result").hidden = false;
  const ref = result.dtypes[result.reference];
  const ratio = (x, r) => (x && r ? `${(x / r).toFixed(2)}x` : "–");
  $("#report-table tbody").replaceChildren(...Object.values(result.dtypes).map((d) => el("tr", { "data-dtype": d.dtype },
    el("td", {}, d.dtype), el("td", { class: "num" }, pct(d.top1_agreement)), el("td", { class: "num" }, fixed(d.kl_mean, 5)),
    el("td", { class: "num" }, fixed(d.kl_max, 5)), el("td", { class: "num" }, pct(d.task_accuracy)),
    el("td", { class: "num" }, `${bytes(d.total_bytes)} (${ratio(d.total_bytes, ref.total_bytes)})`),
    el("td", { class: "num" }, fixed(d.bits_per_weight, 2)),
    el("td", { class: "num" }, `${fixed(d.decode_tok_s, 1)} (${ratio(d.decode_tok_s, ref.decode_tok_s)})`),
    el("td", { class: "num" }, `${fixed(d.decode_batch_tok_s, 1)} (${ratio(d.decode_batch_tok_s, ref.decode_batch_tok_s)})`),
    el("td", { class: "num" }, fixed(d.prefill_tok_s, 1)), el("td", { class: "num" }, pct(d.nonfinite_share)))));
  drawChart(result);
}
function drawChart(result) {
  const [key, label, format] = METRICS.find(([k]) => k === $("#report-metric").value) || METRICS[0];
  const entries = Object.values(result.dtypes).filter((d) => typeof d[key] === "number");
  const W = 640, H = 320, left = 70, bottom = 40, top = 40;
  const max = Math.max(...entries.map((d) => d[key]), 1e-12);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${label} per dtype` });
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    chart.append(svg("line", { x1: left, x2: W - 10, y1: y(v), y2: y(v), stroke: "#e3e6ec" }),
      svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#5d6678" }, format(v)));
  }
  const slot = (W - left - 10) / Math.max(entries.length, 1);
  entries.forEach((d, i) => {
    const x = left + i * slot + slot * 0.2, w = slot * 0.6, v = d[key];
    const rect = svg("rect", { x, y: y(v), width: w, height: Math.max(H - bottom - y(v), 1), rx: 3,
      fill: COLORS[i % COLORS.length], class: "bar-value", "data-dtype": d.dtype });
    rect.append(svg("title", {}, `${d.dtype}: ${label} ${format(v)}`));
    rect.addEventListener("click", () => selectDtype(d.dtype));
    chart.append(rect, svg("text", { x: x + w / 2, y: y(v) - 5, "text-anchor": "middle", "font-size": 12 }, format(v)),
      svg("text", { x: x + w / 2, y: H - bottom + 16, "text-anchor": "middle", "font-size": 12 }, d.dtype));
  });
  const ref = result.dtypes[result.reference];
  if (ref && typeof ref[key] === "number") {
    chart.append(svg("line", { x1: left, x2: W - 10, y1: y(ref[key]), y2: y(ref[key]), stroke: "#1d2330",
      "stroke-dasharray": "4 3" }));
  }
  chart.append(svg("text", { x: left, y: 14, "font-size": 13, "font-weight": 600 }, `${label} · ${result.model}`));
  $("#report-chart").replaceChildren(chart);
}
function selectDtype(dtype) {
  for (const row of $("#report-table tbody").children) row.classList.toggle("selected", row.dataset.dtype === dtype);
  for (const bar of document.querySelectorAll("#report-chart rect.bar-value")) {
    bar.classList.toggle("selected", bar.dataset.dtype === dtype);
  }
}

// ---- the playground: streamed generations, one or two dtypes, and where their texts diverge
async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}
function samplingFields() {
  const fields = { max_tokens: Number($("#play-max-tokens").value), temperature: Number($("#play-temperature").value),
    top_p: Number($("#play-top-p").value), stream: true };
  if ($("#play-seed").value !== "") fields.seed = Number($("#play-seed").value);
  return fields;
}
// One streamed request; calls onText with each delta; returns {text, stats} for the pane.
async function streamOne(dtype, onText, signal) {
  const model = $("#play-model").value;
  const chat = $("#play-mode").value === "chat";
  const prompt = $("#play-prompt").value;
  const body = chat
    ? { model: `${model}:${dtype}`, messages: [...state.chat, { role: "user", content: prompt }],
      stream_options: { include_usage: true }, ...samplingFields() }
    : { prompt, model, dtype, ...samplingFields() };
  const began = performance.now();
  const r = await fetch(chat ? "/v1/chat/completions" : "/generate",
    { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  if (!r.ok) await raise(r);
  const rid = ` · request ${r.headers.get("x-request-id")}`;
  let text = "", summary = null, firstAt = null;
  for await (const { event, data } of sse(r)) {
    if (data === "[DONE]") break;
    const msg = JSON.parse(data);
    if (event === "error" || msg.error) throw new ApiError(msg.error?.status, msg.error?.message || data);
    const delta = chat ? msg.choices?.[0]?.delta?.content : msg.text;
    if (delta) { firstAt ??= performance.now(); text += delta; onText(text); }
    if (chat ? msg.usage : msg.finish_reason) summary = msg;
  }
  const seconds = (performance.now() - began) / 1000;
  if (chat) {
    const tokens = summary?.usage?.completion_tokens;
    const decodeS = firstAt ? (performance.now() - firstAt) / 1000 : 0;
    return { text, stats: `${tokens ?? "?"} tokens · ${tokens && decodeS ? (tokens / decodeS).toFixed(1) : "–"} tokens/s ` +
      `measured in the browser · first text after ${fixed(firstAt ? (firstAt - began) / 1000 : null, 3)} s${rid}` };
  }
  const t = summary.timings;
  state.lastTtft[`${summary.model}:${summary.dtype}`] = t.time_to_first_token_s;
  return { text, stats: `${summary.usage.completion_tokens} tokens · ${fixed(t.tokens_per_second, 1)} tokens/s · ` +
    `first token ${fixed(t.time_to_first_token_s, 3)} s · ${summary.finish_reason} · ${fixed(seconds, 2)} s in all` +
    (summary.warnings.length ? ` · ${summary.warnings.join("; ")}` : "") + rid };
}
function firstDifference(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i === a.length && i === b.length ? -1 : i;
}
function markFrom(pre, text, index) {
  pre.replaceChildren(text.slice(0, index), ...(index < text.length ? [el("mark", {}, text.slice(index))] : []));
}
async function runPane(pane, dtype, signal) {
  $(".pane-title", pane).textContent = `${$("#play-model").value} · ${dtype}`;
  const out = $(".out", pane);
  out.textContent = "";
  $(".stats", pane).textContent = "streaming…";
  pane.dataset.state = "running";
  try {
    const result = await streamOne(dtype, (text) => { out.textContent = text; }, signal);
    $(".stats", pane).textContent = result.stats;
    pane.dataset.state = "done";
    return result.text;
  } catch (e) {
    $(".stats", pane).textContent = e.name === "AbortError" ? "stopped" : e.message;
    pane.dataset.state = "failed";
    throw e;
  }
}
$("#play-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const compare = $("#play-compare").checked;
  const [paneA, paneB] = [$("#pane-a"), $("#pane-b")];
  paneB.hidden = !compare;
  paneA.dataset.state = paneB.dataset.state = "waiting";
  $("#divergence").hidden = true;
  state.controller = new AbortController();
  $("#play-run").disabled = true;
  $("#play-stop").disabled = false;
  try {
    // one after the other, so that each one's tokens/s is its own
    const a = await runPane(paneA, $("#play-dtype-a").value, state.controller.signal);
    const b = compare ? await runPane(paneB, $("#play-dtype-b").value, state.controller.signal) : null;
    if (compare) showDivergence(paneA, a, paneB, b);
    if ($("#play-mode").value === "chat") addChatTurn($("#play-prompt").value, a);
  } catch (e) { if (e.name !== "AbortError") showError(e); } finally {
    $("#play-run").disabled = false;
    $("#play-stop").disabled = true;
  }
});
function showDivergence(paneA, a, paneB, b) {
  const at = firstDifference(a, b);
  const note = $("#divergence");
  note.hidden = false;
  if (at < 0) { note.textContent = "The two texts are identical."; return; }
  markFrom($(".out", paneA), a, at);
  markFrom($(".out", paneB), b, at);
  note.textContent = `The texts diverge at character ${at} (after “${a.slice(Math.max(0, at - 30), at)}”); ` +
    "the marked text differs.";
}
$("#play-stop").addEventListener("click", () => state.controller && state.controller.abort());
function addChatTurn(user, assistant) {
  state.chat.push({ role: "user", content: user }, { role: "assistant", content: assistant });
  renderChat();
  $("#play-prompt").value = "";
}
function renderChat() {
  $("#chat-log").replaceChildren(...state.chat.map((m) => el("p", {}, el("span", { class: "role" }, m.role), m.content)));
}
$("#play-mode").addEventListener("change", () => {
  const chat = $("#play-mode").value === "chat";
  $("#chat-log").hidden = !chat;
  $("#chat-clear").hidden = !chat;
  $("#play-prompt").placeholder = chat ? "your message" : "prompt";
});
$("#chat-clear").addEventListener("click", () => { state.chat = []; renderChat(); });

// ---- live: counters from /memory and /metrics, turned into rates between two polls
function metricValue(text, name) {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(" ")[1]) : null;
}
function metricSum(text, name) {  // a metric's samples summed over their labels
  return text.split("\n").filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `))
    .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
}
async function refreshLive() {
  const [memory, metrics] = await Promise.all([api("GET", "/memory"), api("GET", "/metrics")]);
  const now = performance.now();
  const previous = state.live;
  state.live = { at: now, variants: Object.fromEntries(memory.data.variants.map((v) => [`${v.model}:${v.dtype}`, v])) };
  const rate = (id, field) => {
    const before = previous && previous.variants[id];
    if (!before) return "–";
    return fixed((state.live.variants[id][field] - before[field]) / ((now - previous.at) / 1000), 1);
  };
  const open = metricValue(metrics.data, "dtype_serve_open_requests");
  const running = memory.data.variants.reduce((n, v) => n + v.in_flight, 0);
  const waiting = metricSum(metrics.data, "dtype_serve_num_requests_waiting");
  $("#live-summary").textContent = `${open ?? "–"} open requests: ${running} running on a variant, ${waiting} waiting`;
  $("#live-table tbody").replaceChildren(...memory.data.variants.map((v) => {
    const id = `${v.model}:${v.dtype}`;
    return el("tr", { "data-variant": id }, el("td", {}, id), el("td", { class: "num" }, v.in_flight),
      el("td", { class: "num" }, rate(id, "tokens_generated")), el("td", { class: "num" }, rate(id, "requests_served")),
      el("td", { class: "num" }, v.requests_served), el("td", { class: "num" }, v.tokens_generated),
      el("td", { class: "num" }, id in state.lastTtft ? `${fixed(state.lastTtft[id], 3)} s` : "–"));
  }));
}

// ---- start: the lists of models and dtypes come from the API, never from the page
async function start() {
  let models;
  try {
    models = (await api("GET", "/models")).data;
  } catch (e) {
    if (e.status !== 401) showError(e);
    return;
  }
  $("#key-form").hidden = true;
  $("main").hidden = false;
  state.models = models;
  const dtypes = models.dtypes;
  for (const id of ["#load-model", "#report-model", "#play-model"]) fillSelect($(id), models.models, models.default.model);
  fillSelect($("#load-dtype"), dtypes, dtypes.find((d) => d !== "auto" && d !== models.default.dtype));
  fillSelect($("#play-dtype-a"), dtypes, models.default.dtype);
  fillSelect($("#play-dtype-b"), dtypes, dtypes.find((d) => d !== "auto" && d !== models.default.dtype));
  const measured = models.report_dtypes || dtypes;  // the report measures these against float32
  $("#report-dtypes").replaceChildren(el("legend", {}, "dtypes"), ...measured.filter((d) => d !== "auto" && d !== "float32")
    .map((d) => el("label", {}, el("input", { type: "checkbox", value: d, checked: true }), d)));
  fillSelect($("#report-metric"), METRICS.map(([k]) => k));
  for (const option of $("#report-metric").options) option.textContent = METRICS.find(([k]) => k === option.value)[1];
  show(state.view);
}
start();
