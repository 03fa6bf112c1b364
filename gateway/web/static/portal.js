"use strict";
// The usage portal: a key holder sees their own key; the admin key sees every team.
// Every value from the gateway (team names, key ids, models, paths: config or client data) goes
// into the page as text or as an attribute value, never as markup: no innerHTML anywhere, which
// the Content-Security-Policy (no inline script or style) backs up.
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

// An element with attributes and children; strings among the children become text nodes.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  node.append(...children.map((child) => (child instanceof Node ? child : String(child))));
  return node;
}

function svgEl(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = String(text);
  return node;
}

const SPANS = { "1d": { seconds: 86400, count: 14 }, "1h": { seconds: 3600, count: 48 } };

function formatUsd(nano) {
  const value = BigInt(nano);
  const sign = value < 0n ? "-" : "";
  const abs = value < 0n ? -value : value;
  let fraction = (abs % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "");
  if (fraction.length < 2) fraction = fraction.padEnd(2, "0");
  return `${sign}${abs / 1000000000n}.${fraction}`;
}

async function getJson(path, key) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}` } });
  const body = await response.json().catch(() => ({}));
  return { status: response.status, body };
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function range(width) {
  const span = SPANS[width];
  const end = Math.ceil(Date.now() / 1000);
  const start = Math.floor(end / span.seconds) * span.seconds - (span.count - 1) * span.seconds;
  return { start, end };
}

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
    renew.textContent = `This key expires on ${me.expires}: ask for a new one before then.`;
  }
  const rows = Object.entries(me.limits).map(([name, entry]) => {
    const share = entry.limit ? Math.min(100, (100 * entry.used) / entry.limit) : 0;
    const resets = entry.resets_at ? new Date(entry.resets_at).toLocaleString() : "when a call ends";
    const fill = el("span");
    fill.style.width = `${share}%`; // a CSSOM property, which style-src 'self' allows
    return el("tr", { "data-limit": name },
      el("td", {}, name, el("div", { class: "bar" }, fill)),
      el("td", { class: "used" }, entry.used),
      el("td", { class: "remaining" }, `${entry.remaining} of ${entry.limit}`),
      el("td", {}, resets));
  });
  $("limits").querySelector("tbody").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 4 }, "No limits are set for this key or its team."))]));
  $("me").hidden = false;
}

function barChart(element, buckets, valueOf, label) {
  const values = buckets.map(valueOf);
  const max = Math.max(1, ...values);
  const width = 600, height = 140, bottom = 18, gap = 2;
  const barWidth = width / Math.max(1, values.length);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
  svg.append(svgEl("text", { x: 0, y: 10 }, `max ${label(max)}`));
  values.forEach((value, i) => {
    const h = ((height - bottom - 12) * value) / max;
    const bar = svgEl("rect", { x: i * barWidth + gap / 2, y: height - bottom - h, width: barWidth - gap, height: h });
    bar.append(svgEl("title", {}, label(value)));
    svg.append(bar);
  });
  const when = (b) => new Date(b.start_time * 1000).toISOString().slice(5, buckets.length > 20 ? 13 : 10).replace("T", " ");
  for (const i of [0, Math.floor(values.length / 2), values.length - 1].filter((i) => buckets[i])) {
    svg.append(svgEl("text", { x: i * barWidth, y: height - 4 }, when(buckets[i])));
  }
  element.replaceChildren(svg);
}

function renderCharts(buckets) {
  const sum = (field) => buckets.reduce((total, b) => total + Number(b[field] || 0), 0);
  $("total-calls").textContent = sum("requests");
  $("total-tokens").textContent = sum("input_tokens") + sum("output_tokens");
  $("total-cost").textContent = formatUsd(buckets.reduce((t, b) => t + BigInt(b.cost_nanousd || 0), 0n));
  barChart($("chart-calls"), buckets, (b) => b.requests, (v) => `${v} calls`);
  barChart($("chart-tokens"), buckets, (b) => b.input_tokens + b.output_tokens, (v) => `${v} tokens`);
  barChart($("chart-cost"), buckets, (b) => b.cost_nanousd, (v) => `${formatUsd(Math.round(v))} USD`);
  $("charts").hidden = false;
}

function totalsPerBucket(data) {
  return data.map((bucket) => {
    const total = { start_time: bucket.start_time, requests: 0, errors: 0, input_tokens: 0, output_tokens: 0, cost_nanousd: 0 };
    for (const r of bucket.results) {
      for (const field of ["requests", "errors", "input_tokens", "output_tokens", "cost_nanousd"]) total[field] += Number(r[field] || 0);
    }
    return total;
  });
}

function renderTeams(data) {
  const teams = {};
  for (const bucket of data) {
    for (const r of bucket.results) {
      const t = (teams[r.team || "(no team)"] ||= { requests: 0, errors: 0, tokens: 0, cost: 0n });
      t.requests += r.requests; t.errors += r.errors;
      t.tokens += r.input_tokens + r.output_tokens; t.cost += BigInt(r.cost_nanousd);
    }
  }
  $("team-table").querySelector("tbody").replaceChildren(...Object.entries(teams).sort().map(([name, t]) =>
    el("tr", { "data-team": name },
      el("td", {}, name), el("td", { class: "calls" }, t.requests), el("td", {}, t.errors),
      el("td", {}, t.tokens), el("td", { class: "cost" }, formatUsd(t.cost)))));
  $("teams").hidden = false;
}

// ---------------------------------------------------------------- the admin's keys

async function sendJson(method, path, key, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  return { status: response.status, body: answer };
}

function failed(result) {
  return (result.body.error && result.body.error.message) || `HTTP ${result.status}`;
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
  const select = $("issue-team");
  const chosen = select.value;
  select.replaceChildren(...teams.map((team) => el("option", { value: team }, team)));
  if (teams.includes(chosen)) select.value = chosen;
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
  const key = $("key").value.trim();
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

async function load() {
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem("gateway-key", key);
  const width = $("width").value;
  const { start, end } = range(width);
  setStatus("Loading…");
  const me = await getJson("/gateway/me", key);
  if (me.status === 200) {
    renderMe(me.body);
    const usage = await getJson(`/gateway/me/usage?${new URLSearchParams({ bucket_width: width, start_time: start, end_time: end })}`, key);
    renderCharts(usage.body.data);
    setStatus(`Usage of key ${me.body.key_id}.`);
    return;
  }
  const admin = await getJson(`/gateway/usage?${new URLSearchParams({ bucket_width: width, start_time: start, end_time: end, group_by: "team" })}`, key);
  if (admin.status === 200) {
    $("me").hidden = true;
    renderCharts(totalsPerBucket(admin.body.data));
    renderTeams(admin.body.data);
    await loadKeys(key);
    setStatus("Admin view: every team.");
    return;
  }
  setStatus((me.body.error && me.body.error.message) || "That key was not accepted.", true);
}

$("login").addEventListener("submit", (event) => { event.preventDefault(); load(); });
$("issue").addEventListener("submit", issueKey);
$("width").addEventListener("change", load);
const saved = sessionStorage.getItem("gateway-key");
if (saved) { $("key").value = saved; load(); }
