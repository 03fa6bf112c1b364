"use strict";
// The portal: a key holder sees their own key (spend, limits, usage by model and over time,
// latest calls, the team's invoice, how to use the key); the admin key sees every team, key,
// call, refusal and price, and manages keys.
// Every value from the gateway (team names, key ids, models, paths: config or client data) goes
// into the page as text or as an attribute value, never as markup: no innerHTML anywhere, which
// the Content-Security-Policy (no inline script or style) backs up. The key lives in this tab's
// sessionStorage only and goes in an Authorization header, never in a URL.
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children.map((child) => (child instanceof Node ? child : String(child ?? ""))));
  return node;
}

function svgEl(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = String(text);
  return node;
}

// Ranges of the usage charts: bucket width and how many buckets.
const RANGES = {
  "1d": { width: "1d", seconds: 86400, count: 14, unit: "day" },
  "1d30": { width: "1d", seconds: 86400, count: 30, unit: "day" },
  "1h": { width: "1h", seconds: 3600, count: 48, unit: "hour" },
};
const SUM_FIELDS = ["requests", "errors", "input_tokens", "output_tokens", "cost_nanousd"];
const state = { key: "", admin: false, me: null, callsBefore: null, callsKey: null, calls: [] };

function formatUsd(nano) {
  const value = BigInt(nano);
  const sign = value < 0n ? "-" : "";
  const abs = value < 0n ? -value : value;
  let fraction = (abs % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  return `${sign}${abs / 1000000000n}.${fraction}`;
}

const formatInt = (n) => Number(n).toLocaleString("en-US");
const formatMs = (ms) => (ms === null || ms === undefined ? "–" : Number(ms).toFixed(1));
const when = (seconds) => new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);

async function getJson(path, key = state.key) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}` } });
  const body = await response.json().catch(() => ({}));
  return { status: response.status, body };
}

function failed(result) {
  return (result.body.error && result.body.error.message) || `HTTP ${result.status}`;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function rangeOf(choice) {
  const range = RANGES[choice];
  const end = Math.ceil(Date.now() / 1000);
  const start = Math.floor(end / range.seconds) * range.seconds - (range.count - 1) * range.seconds;
  return { ...range, start, end };
}

function fill(table, rows, emptyText, columns) {
  table.querySelector("tbody").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText))]));
}

// ---------------------------------------------------------------- the key holder

function renderMe(me) {
  $("team").textContent = me.team;
  $("key-id").textContent = me.key_id;
  $("plan").textContent = me.plan;
  $("expires").textContent = me.expires ? `${me.expires} (${me.days_left} days left)` : "never";
  $("spend-today").textContent = `${formatUsd(Math.round(me.spend_usd.today * 1e9))} USD`;
  $("spend-month").textContent = `${formatUsd(Math.round(me.spend_usd.month * 1e9))} USD`;
  const renew = $("renew");
  renew.hidden = !me.renew_warning;
  if (me.renew_warning) {
    renew.textContent = `This key expires on ${me.expires}: ask your gateway's operator for a new one before then.`;
  }
  $("renew-how").textContent = me.expires
    ? `This key works until ${me.expires} (${me.days_left} days). To renew it, ask the operator of this gateway to renew key ${me.key_id} (metering-gateway keys renew ${me.key_id}, or Renew in the admin view).`
    : `This key (${me.key_id}) does not expire; the operator can revoke it at any time.`;
  const rows = Object.entries(me.limits).map(([name, entry]) => {
    const share = entry.limit ? Math.min(100, (100 * entry.used) / entry.limit) : 0;
    const resets = entry.resets_at ? new Date(entry.resets_at).toLocaleString() : "when a call ends";
    const bar = el("span");
    bar.style.width = `${share}%`; // a CSSOM property, which style-src 'self' allows
    return el("tr", { "data-limit": name, class: share >= 80 ? "near" : "" },
      el("td", {}, name, share >= 80 ? el("span", { class: "badge" }, share >= 100 ? "used up" : "near its cap") : "",
        el("div", { class: "bar" }, bar)),
      el("td", { class: "used" }, entry.used),
      el("td", { class: "remaining" }, `${entry.remaining} of ${entry.limit}`),
      el("td", {}, resets));
  });
  fill($("limits"), rows, "No limits are set for this key or its team.", 4);
  $("me").hidden = false;
}

// A chart's frame: the SVG, a y axis (0, half, max, in the chart's unit) and the geometry.
const FRAME = { width: 600, height: 220, left: 112, bottom: 28, top: 12 };

function chartFrame(element, buckets, max, formatTick) {
  const { width, height, left, bottom, top } = FRAME;
  const plotHeight = height - bottom - top;
  const step = (width - left) / Math.max(1, buckets.length);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": element.id });
  for (const tick of [0, max / 2, max]) {
    const y = top + plotHeight - (plotHeight * tick) / max;
    svg.append(svgEl("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: left - 6, y: y + 6, "text-anchor": "end" }, formatTick(tick)));
  }
  return { svg, step, plotHeight, top, left, height };
}

// A (stacked) bar chart with dates under it.
function barChart(element, buckets, series, format) {
  const totals = buckets.map((b) => series.reduce((sum, s) => sum + s.value(b), 0));
  const max = Math.max(...totals, 0) || 1;
  const { svg, step, plotHeight, top, left, height } = chartFrame(element, buckets, max, format);
  buckets.forEach((bucket, i) => {
    let base = top + plotHeight;
    for (const s of series) {
      const h = (plotHeight * s.value(bucket)) / max;
      if (h <= 0) continue;
      base -= h;
      const bar = svgEl("rect", { x: left + i * step + 1, y: base, width: Math.max(1, step - 2), height: h, class: s.name });
      bar.append(svgEl("title", {}, `${when(bucket.start_time).slice(0, 16)}: ${format(s.value(bucket))} ${s.label}`));
      svg.append(bar);
    }
  });
  axisDates(svg, buckets, left, step, height);
  element.replaceChildren(svg);
}

function axisDates(svg, buckets, left, step, height) {
  const hourly = buckets.length > 1 && buckets[1].start_time - buckets[0].start_time < 86400;
  for (const i of [0, Math.floor(buckets.length / 2), buckets.length - 1]) {
    if (!buckets[i]) continue;
    const label = when(buckets[i].start_time).slice(5, hourly ? 16 : 10);
    const anchor = i === 0 ? "start" : i === buckets.length - 1 ? "end" : "middle";
    const x = left + i * step + (anchor === "end" ? step : anchor === "middle" ? step / 2 : 0);
    svg.append(svgEl("text", { x, y: height - 6, "text-anchor": anchor }, label));
  }
}

function lineChart(element, buckets, series) {
  const values = buckets.flatMap((b) => series.map((s) => s.value(b)).filter((v) => v !== null && v !== undefined));
  const max = Math.max(...values, 0) || 1;
  const { svg, step, plotHeight, top, left, height } = chartFrame(
    element, buckets, max, (tick) => `${tick.toFixed(tick < 10 ? 1 : 0)} ms`);
  for (const s of series) {
    const points = buckets.map((b, i) => [i, s.value(b)]).filter(([, v]) => v !== null && v !== undefined);
    if (!points.length) continue;
    const path = points.map(([i, v], n) => `${n ? "L" : "M"}${left + i * step + step / 2},${top + plotHeight - (plotHeight * v) / max}`).join(" ");
    svg.append(svgEl("path", { d: path, class: `line ${s.name}` }));
    for (const [i, v] of points) {
      const dot = svgEl("circle", { cx: left + i * step + step / 2, cy: top + plotHeight - (plotHeight * v) / max, r: 2.5, class: s.name });
      dot.append(svgEl("title", {}, `${s.label}: ${formatMs(v)} ms`));
      svg.append(dot);
    }
  }
  axisDates(svg, buckets, left, step, height);
  element.replaceChildren(svg);
}

function renderCharts(buckets, unit) {
  const sum = (field) => buckets.reduce((total, b) => total + Number(b[field] || 0), 0);
  $("total-calls").textContent = sum("requests");
  $("total-errors").textContent = sum("errors");
  $("total-tokens").textContent = sum("input_tokens") + sum("output_tokens");
  $("total-cost").textContent = formatUsd(buckets.reduce((t, b) => t + BigInt(b.cost_nanousd || 0), 0n));
  for (const span of document.querySelectorAll(".unit-bucket")) span.textContent = unit;
  barChart($("chart-cost"), buckets, [{ name: "cost", label: "USD", value: (b) => Number(b.cost_nanousd) }],
    (v) => formatUsd(Math.round(v)));
  barChart($("chart-calls"), buckets, [
    { name: "ok", label: "calls without error", value: (b) => b.requests - b.errors },
    { name: "errors", label: "errors", value: (b) => b.errors },
  ], (v) => formatInt(Math.round(v)));
  barChart($("chart-tokens"), buckets, [{ name: "tokens", label: "tokens", value: (b) => b.input_tokens + b.output_tokens }],
    (v) => formatInt(Math.round(v)));
  // The admin's usage is summed from hourly rollups: latency percentiles are per key.
  $("chart-latency").closest("figure").hidden = state.admin;
  lineChart($("chart-latency"), buckets, [
    { name: "p50", label: "p50", value: (b) => b.latency_p50_ms },
    { name: "p95", label: "p95", value: (b) => b.latency_p95_ms },
  ]);
  $("charts").hidden = false;
}

// Sums of `results[]` over every bucket, by the names `keyOf` picks.
function groupTotals(buckets, keyOf) {
  const groups = new Map();
  for (const bucket of buckets) {
    for (const result of bucket.results) {
      const name = keyOf(result);
      const total = groups.get(name) || { requests: 0, errors: 0, input_tokens: 0, output_tokens: 0, cost: 0n };
      for (const field of SUM_FIELDS.slice(0, 4)) total[field] += Number(result[field] || 0);
      total.cost += BigInt(result.cost_nanousd || 0);
      groups.set(name, total);
    }
  }
  return [...groups.entries()].sort((a, b) => (b[1].cost > a[1].cost ? 1 : b[1].cost < a[1].cost ? -1 : 0));
}

function renderModels(table, buckets) {
  const rows = groupTotals(buckets, (r) => r.model ?? "(no model)").map(([model, t]) =>
    el("tr", { "data-model": model },
      el("td", { class: "name" }, model), el("td", { class: "calls" }, t.requests), el("td", {}, t.errors),
      el("td", { class: "input" }, t.input_tokens), el("td", { class: "output" }, t.output_tokens),
      el("td", { class: "cost" }, formatUsd(t.cost))));
  fill(table, rows, "No calls in this range.", 6);
}

// ---------------------------------------------------------------- latest calls

async function loadCalls(reset, keyId = state.callsKey) {
  if (reset) {
    state.callsBefore = null;
    state.calls = [];
    state.callsKey = keyId;
  }
  const query = { limit: 50 };
  if (state.callsBefore) query.before = state.callsBefore;
  if (state.admin && state.callsKey) query.key = state.callsKey;
  const result = await getJson(`/gateway/me/calls?${new URLSearchParams(query)}`);
  if (result.status !== 200) { setStatus(failed(result), true); return; }
  state.calls.push(...result.body.data);
  const last = result.body.data[result.body.data.length - 1];
  state.callsBefore = last ? last.request_id : state.callsBefore;
  $("older").hidden = !result.body.has_more;
  $("calls-scope").textContent = state.admin ? (state.callsKey ? `of key ${state.callsKey}` : "of every key") : "";
  renderCalls();
  $("calls").hidden = false;
}

function renderCalls() {
  const failedOnly = $("failed-only").checked;
  const rows = state.calls
    .filter((call) => !failedOnly || call.outcome !== "ok")
    .map((call) => el("tr", { "data-request-id": call.request_id, class: call.outcome === "ok" ? "" : "failed" },
      el("td", { class: "time" }, when(call.started_at)),
      el("td", { class: "model" }, call.model ?? "–"),
      el("td", { class: "status" }, `${call.status}${call.outcome === "ok" ? "" : ` ${call.error_code || call.outcome}`}`),
      el("td", { class: "tokens" }, `${call.input_tokens} / ${call.output_tokens}`),
      el("td", { class: "cost" }, formatUsd(call.cost_nanousd)),
      el("td", { class: "latency" }, formatMs(call.latency_ms)),
      el("td", { class: "ttfb" }, formatMs(call.ttfb_ms)),
      el("td", { class: "request-id" }, call.request_id)));
  fill($("call-table"), rows, failedOnly ? "No failed calls among these." : "No calls yet.", 8);
}

// ---------------------------------------------------------------- the invoice

function invoiceQuery(format) {
  const query = { month: $("invoice-month").value };
  if (state.admin) query.team = $("invoice-team").value;
  if (format) query.format = format;
  return `/gateway/me/invoice?${new URLSearchParams(query)}`;
}

async function showInvoice(event) {
  if (event) event.preventDefault();
  const result = await getJson(invoiceQuery());
  if (result.status !== 200) { setStatus(failed(result), true); return; }
  const invoice = result.body;
  const head = el("tr", {}, ...["Item", "Calls", "Input", "Cached", "Output", "Amount USD"].map((t) => el("th", { scope: "col" }, t)));
  const rows = invoice.lines.map((line) => el("tr", { "data-item": line.model ?? "" },
    el("td", {}, line.model ?? "(no model)"), el("td", {}, line.calls), el("td", {}, line.input_tokens),
    el("td", {}, line.cached_input_tokens), el("td", {}, line.output_tokens),
    el("td", { class: "amount" }, formatUsd(line.amount_nanousd))));
  for (const adjustment of invoice.adjustments) {
    rows.push(el("tr", {}, el("td", { colspan: 5 }, adjustment.description), el("td", { class: "amount" }, formatUsd(adjustment.amount_nanousd))));
  }
  rows.push(el("tr", { class: "total", "data-item": "total" }, el("td", { colspan: 5 }, `Total, ${invoice.month}, plan ${invoice.plan}`),
    el("td", { class: "amount", id: "invoice-total" }, formatUsd(invoice.total_nanousd))));
  $("invoice-table").querySelector("thead").replaceChildren(head);
  $("invoice-table").querySelector("tbody").replaceChildren(...rows);
}

// Fetched with the key in a header, then saved from a blob: the key never goes in a URL.
async function downloadInvoice(format) {
  const response = await fetch(invoiceQuery(format === "csv" ? "csv" : "json"), { headers: { Authorization: `Bearer ${state.key}` } });
  if (response.status !== 200) { setStatus(`The invoice could not be downloaded (HTTP ${response.status}).`, true); return; }
  const blob = await response.blob();
  const team = state.admin ? $("invoice-team").value : state.me.team;
  const link = el("a", { href: URL.createObjectURL(blob), download: `invoice-${team}-${$("invoice-month").value}.${format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// ---------------------------------------------------------------- quick start

const SNIPPETS = {
  python: (base) => `from openai import OpenAI

client = OpenAI(base_url="${base}", api_key="YOUR_GATEWAY_KEY")
reply = client.chat.completions.create(
    model="gpt-4o-mini",
    messages=[{"role": "user", "content": "Hello!"}],
)
print(reply.choices[0].message.content)`,
  node: (base) => `import OpenAI from "openai";

const client = new OpenAI({ baseURL: "${base}", apiKey: "YOUR_GATEWAY_KEY" });
const reply = await client.chat.completions.create({
  model: "gpt-4o-mini",
  messages: [{ role: "user", content: "Hello!" }],
});
console.log(reply.choices[0].message.content);`,
  curl: (base) => `curl ${base}/chat/completions \\
  -H "Authorization: Bearer YOUR_GATEWAY_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'`,
};

function showSnippet(name) {
  const base = `${location.origin}/v1`;
  $("base-url").textContent = base;
  $("snippet").textContent = SNIPPETS[name](base);
  $("snippet").dataset.language = name;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.snippet === name));
}

// ---------------------------------------------------------------- the admin

function renderTeams(buckets) {
  const teams = groupTotals(buckets, (r) => r.team ?? "(unknown key)");
  const rows = teams.sort((a, b) => (a[0] < b[0] ? -1 : 1)).map(([name, t]) => {
    const open = el("button", { type: "button", class: "link" }, name);
    open.addEventListener("click", () => renderTeamKeys(name, buckets));
    return el("tr", { "data-team": name },
      el("td", {}, name === "(unknown key)" ? name : open), el("td", { class: "calls" }, t.requests), el("td", {}, t.errors),
      el("td", {}, t.input_tokens + t.output_tokens), el("td", { class: "cost" }, formatUsd(t.cost)));
  });
  fill($("team-table"), rows, "No calls in this range.", 5);
  $("teams").hidden = false;
}

function renderTeamKeys(team, buckets) {
  const keys = groupTotals(buckets.map((b) => ({ results: b.results.filter((r) => r.team === team) })), (r) => r.key ?? "(none)");
  const rows = keys.map(([keyId, t]) => {
    const open = el("button", { type: "button", class: "link" }, keyId);
    open.addEventListener("click", () => { loadCalls(true, keyId); $("calls").scrollIntoView(); });
    return el("tr", { "data-key": keyId },
      el("td", {}, open), el("td", { class: "calls" }, t.requests), el("td", {}, t.errors),
      el("td", {}, t.input_tokens + t.output_tokens), el("td", { class: "cost" }, formatUsd(t.cost)));
  });
  $("team-keys-name").textContent = team;
  fill($("team-key-table"), rows, "No calls of this team in this range.", 5);
  $("team-keys").hidden = false;
}

async function loadRefusals(start) {
  const result = await getJson(`/gateway/refusals?${new URLSearchParams({ start_time: start })}`);
  if (result.status !== 200) return;
  const rows = result.body.data.map((r) => el("tr", { "data-limit": r.rejected_by ?? "" },
    el("td", {}, r.team ?? "(unknown key)"), el("td", {}, r.key_id ?? "–"), el("td", { class: "limit" }, r.rejected_by ?? "–"),
    el("td", {}, r.error_code ?? "–"), el("td", {}, r.status), el("td", { class: "refused" }, r.refused)));
  fill($("refusal-table"), rows, "No call was refused in this range.", 6);
  $("refusals").hidden = false;
}

async function loadPrices() {
  const result = await getJson("/gateway/prices");
  if (result.status !== 200) return;
  const price = (entry, unit) => (entry.usd_per_million[unit] === null ? "–" : entry.usd_per_million[unit]);
  const rows = result.body.data.map((entry) => el("tr", { "data-model": entry.model },
    el("td", {}, entry.model), el("td", {}, entry.source), el("td", { class: "input" }, price(entry, "input")),
    el("td", {}, price(entry, "cached_input")), el("td", { class: "output" }, price(entry, "output")),
    el("td", {}, price(entry, "audio_input")), el("td", {}, price(entry, "audio_output"))));
  fill($("price-table"), rows, "No prices.", 7);
  $("prices").hidden = false;
}

async function sendJson(method, path, key, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  return { status: response.status, body: answer };
}

// A button that asks once more before it acts (no dialogs: keyboard and tests alike).
function confirmingButton(label, confirmLabel, act) {
  const button = el("button", { type: "button" }, label);
  button.addEventListener("click", () => {
    if (button.dataset.armed !== "yes") {
      button.dataset.armed = "yes";
      button.textContent = confirmLabel;
      return;
    }
    button.disabled = true;
    act();
  });
  return button;
}

async function loadKeys(key) {
  const listed = await getJson("/gateway/keys", key);
  if (listed.status !== 200) return;
  const keys = listed.body.data;
  const teams = [...new Set(keys.map((k) => k.team))].sort();
  for (const select of [$("issue-team"), $("invoice-team")]) {
    const chosen = select.value;
    select.replaceChildren(...teams.map((team) => el("option", { value: team }, team)));
    if (teams.includes(chosen)) select.value = chosen;
  }
  $("key-table").querySelector("tbody").replaceChildren(...keys.map((k) => {
    const actions = el("td", { class: "actions" });
    if (k.source === "api" && !k.revoked_at) {
      const renew = el("button", { type: "button", class: "renew" }, "Renew 90 days");
      renew.addEventListener("click", async () => {
        const result = await sendJson("PATCH", `/gateway/keys/${encodeURIComponent(k.id)}`, key, { expires: "90d" });
        setStatus(result.status === 200 ? `Key ${k.id} now expires on ${result.body.expires}.` : failed(result), result.status !== 200);
        loadKeys(key);
      });
      const revoke = confirmingButton("Revoke", "Confirm revoke", async () => {
        const result = await sendJson("DELETE", `/gateway/keys/${encodeURIComponent(k.id)}`, key);
        setStatus(result.status === 200 ? `Key ${k.id} is revoked.` : failed(result), result.status !== 200);
        loadKeys(key);
      });
      revoke.classList.add("revoke");
      actions.append(renew, " ", revoke);
    } else if (k.source === "config") {
      actions.append("in the config file");
    }
    return el("tr", { "data-key": k.id },
      el("td", {}, k.id), el("td", {}, k.team), el("td", {}, k.source),
      el("td", { class: "expires" }, k.expires || "never"),
      el("td", { class: "revoked" }, k.revoked_at || ""), actions);
  }));
  $("keys").hidden = false;
}

async function issueKey(event) {
  event.preventDefault();
  const key = state.key;
  const body = { team: $("issue-team").value };
  if ($("issue-id").value.trim()) body.id = $("issue-id").value.trim();
  if ($("issue-expires").value.trim()) body.expires = $("issue-expires").value.trim();
  const result = await sendJson("POST", "/gateway/keys", key, body);
  if (result.status !== 201) {
    setStatus(failed(result), true);
    return;
  }
  $("issued-id").textContent = result.body.id;
  $("issued-secret").textContent = result.body.key;
  $("issued").hidden = false;
  setStatus(`Key ${result.body.id} issued for team ${result.body.team}.`);
  $("issue-id").value = "";
  loadKeys(key);
}

// ---------------------------------------------------------------- loading

function showJumps(ids) {
  $("jump").replaceChildren(...ids.map(([id, label]) => el("a", { href: `#${id}` }, label)));
  $("jump").hidden = false;
}

async function load() {
  const key = $("key").value.trim();
  if (!key) return;
  state.key = key;
  sessionStorage.setItem("gateway-key", key);
  $("forget").hidden = false;
  const range = rangeOf($("width").value);
  const usageQuery = { bucket_width: range.width, start_time: range.start, end_time: range.end, limit: range.count };
  setStatus("Loading…");
  if (!$("invoice-month").value) $("invoice-month").value = new Date().toISOString().slice(0, 7);
  const me = await getJson("/gateway/me", key);
  if (me.status === 200) {
    state.admin = false;
    state.me = me.body;
    renderMe(me.body);
    const usage = await getJson(`/gateway/me/usage?${new URLSearchParams({ ...usageQuery, group_by: "model" })}`);
    if (usage.status !== 200) { setStatus(failed(usage), true); return; }
    renderCharts(usage.body.data, range.unit);
    renderModels($("model-table"), usage.body.data);
    $("invoice-team-label").hidden = true;
    $("invoice").hidden = false;
    $("quickstart").hidden = false;
    showSnippet($("snippet").dataset.language || "python");
    showJumps([["me", "Key"], ["charts", "Usage"], ["calls", "Calls"], ["invoice", "Invoice"], ["quickstart", "Use your key"]]);
    await Promise.all([loadCalls(true, null), showInvoice()]);
    setStatus(`Usage of key ${me.body.key_id}.`);
    return;
  }
  const admin = await getJson(`/gateway/me/usage?${new URLSearchParams({ ...usageQuery, group_by: "team,key,model" })}`, key);
  if (admin.status === 200) {
    state.admin = true;
    $("me").hidden = true;
    renderCharts(admin.body.data, range.unit);
    renderModels($("model-table"), admin.body.data);
    renderTeams(admin.body.data);
    renderModels($("admin-model-table"), admin.body.data);
    $("admin-models").hidden = false;
    await loadKeys(key);
    $("invoice-team-label").hidden = false;
    $("invoice").hidden = false;
    showJumps([["charts", "Usage"], ["teams", "Teams"], ["calls", "Calls"], ["refusals", "Refusals"], ["keys", "Keys"], ["invoice", "Invoices"], ["prices", "Prices"]]);
    await Promise.all([loadCalls(true, null), loadRefusals(range.start), loadPrices(), showInvoice()]);
    setStatus("Admin view: every team.");
    return;
  }
  setStatus((me.body.error && me.body.error.message) || "That key was not accepted.", true);
}

function forget() {
  sessionStorage.removeItem("gateway-key");
  location.reload();
}

$("login").addEventListener("submit", (event) => { event.preventDefault(); load(); });
$("forget").addEventListener("click", forget);
$("issue").addEventListener("submit", issueKey);
$("width").addEventListener("change", load);
$("older").addEventListener("click", () => loadCalls(false));
$("failed-only").addEventListener("change", renderCalls);
$("invoice-form").addEventListener("submit", showInvoice);
$("invoice-csv").addEventListener("click", () => downloadInvoice("csv"));
$("invoice-json").addEventListener("click", () => downloadInvoice("json"));
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showSnippet(tab.dataset.snippet));
$("copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("snippet").textContent);
    setStatus("Copied. Paste your key where it says YOUR_GATEWAY_KEY.");
  } catch {
    setStatus("Select the text and copy it (this browser did not allow the copy).", true);
  }
});
const saved = sessionStorage.getItem("gateway-key");
if (saved) { $("key").value = saved; load(); }
