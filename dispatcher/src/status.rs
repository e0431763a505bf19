//! The live status page at `GET /`: one self-contained HTML document (inline CSS and
//! JavaScript, no CDN, no build step) that a person opens in a browser to watch a running Weir.
//!
//! The page polls `GET /v1/functions` and `GET /metrics` once a second and shows, per function:
//! its route (trigger → outputs, DLQ), events per second (from counter deltas between polls),
//! consumer lag (the `weir_consumer_lag` gauge, parsed from the Prometheus text), instances
//! (live / busy / slots), the counters, sparklines of throughput and lag over the last two
//! minutes, and the latest failures with their reasons.
//!
//! It deliberately keeps no state on the server: everything it draws comes from the admin API
//! and `/metrics`, so the page cannot disagree with what Prometheus scrapes. It is not a
//! dashboard for history (that is Grafana's job in the compose stack): closing the tab forgets
//! the sparklines. Strings from functions (errors, ids) are inserted as text, never as HTML.

use axum::response::Html;

/// The page: static HTML and JavaScript that polls the admin API; no build step.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The document itself. Elements carry `data-*` attributes (`data-function`, `data-counter`,
/// `data-field`, `data-value`) so that tests and scripts can read what the page shows without
/// depending on its layout.
pub const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Weir · status</title>
<style>
  :root {
    --bg: #f4f5f7; --card: #ffffff; --ink: #1d2330; --muted: #6b7385; --line: #e3e6ec;
    --accent: #0f766e; --accent-soft: rgba(15, 118, 110, 0.12);
    --lag: #7c3aed; --lag-soft: rgba(124, 58, 237, 0.12);
    --ok: #15803d; --ok-bg: #dcfce7; --warn: #b45309; --warn-bg: #fef3c7; --bad: #b91c1c; --bad-bg: #fee2e2;
  }
  @media (prefers-color-scheme: dark) {
    :root {
      --bg: #12151c; --card: #1a1f29; --ink: #e6e9ef; --muted: #9099ab; --line: #2a303c;
      --accent: #2dd4bf; --accent-soft: rgba(45, 212, 191, 0.14);
      --lag: #a78bfa; --lag-soft: rgba(167, 139, 250, 0.14);
      --ok: #4ade80; --ok-bg: #14321f; --warn: #fbbf24; --warn-bg: #3a2c0c; --bad: #f87171; --bad-bg: #3b1616;
    }
  }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--ink);
         font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
  header { display: flex; align-items: center; gap: 24px; flex-wrap: wrap;
           padding: 14px 28px; background: var(--card); border-bottom: 1px solid var(--line); }
  .brand { display: flex; align-items: center; gap: 10px; font-size: 20px; font-weight: 650; letter-spacing: -0.01em; }
  .brand small { font-size: 13px; font-weight: 500; color: var(--muted); }
  .totals { display: flex; gap: 28px; margin-left: auto; flex-wrap: wrap; }
  .total { display: flex; flex-direction: column; }
  .total span { font-size: 11px; text-transform: uppercase; letter-spacing: 0.06em; color: var(--muted); }
  .total b { font-size: 18px; font-variant-numeric: tabular-nums; }
  .conn { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 13px; min-width: 150px; }
  .dot { width: 9px; height: 9px; border-radius: 50%; background: var(--muted); }
  .conn.live .dot { background: var(--ok); box-shadow: 0 0 0 3px var(--ok-bg); }
  .conn.down .dot { background: var(--bad); box-shadow: 0 0 0 3px var(--bad-bg); }
  .conn.down { color: var(--bad); }
  main { display: grid; grid-template-columns: repeat(auto-fill, minmax(390px, 1fr)); gap: 18px; padding: 22px 28px; }
  .empty { color: var(--muted); padding: 40px 0; }
  .fn { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px 14px;
        display: flex; flex-direction: column; gap: 12px; min-width: 0; }
  .fn-head { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
  .fn-head h2 { margin: 0; font-size: 16px; font-weight: 650; }
  .badge { font-size: 11px; font-weight: 600; padding: 2px 8px; border-radius: 999px; text-transform: uppercase; letter-spacing: 0.04em; }
  .badge.ok { color: var(--ok); background: var(--ok-bg); }
  .badge.warn { color: var(--warn); background: var(--warn-bg); }
  .badge.bad { color: var(--bad); background: var(--bad-bg); }
  .route { width: 100%; color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
  .route code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--ink); }
  .headline { display: grid; grid-template-columns: repeat(3, 1fr); gap: 10px; }
  .headline > div { display: flex; flex-direction: column; min-width: 0; }
  .headline span, .counters dt, .spark figcaption, .failures h3 {
    font-size: 11px; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted); }
  .headline b { font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
  .headline small { color: var(--muted); font-size: 12px; }
  .slots { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 4px; }
  .slot { width: 10px; height: 10px; border-radius: 2px; border: 1px solid var(--line); }
  .slot.idle { background: var(--accent-soft); border-color: var(--accent); }
  .slot.busy { background: var(--accent); border-color: var(--accent); }
  .sparks { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
  .spark { margin: 0; }
  .spark figcaption { display: flex; justify-content: space-between; }
  .spark figcaption b { font-weight: 600; color: var(--ink); text-transform: none; letter-spacing: 0; }
  .spark svg { display: block; width: 100%; height: 46px; margin-top: 3px; border-bottom: 1px solid var(--line); }
  .counters { display: grid; grid-template-columns: repeat(3, 1fr); gap: 6px 10px; margin: 0;
              padding-top: 10px; border-top: 1px solid var(--line); }
  .counters div { min-width: 0; display: flex; justify-content: space-between; gap: 6px; }
  .counters dt { font-size: 10px; white-space: nowrap; }
  .counters dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
  .counters dd.hot { color: var(--bad); }
  .failures h3 { margin: 0 0 4px; font-weight: 600; }
  .failures ol { list-style: none; margin: 0; padding: 0; font-size: 12px; }
  .failures li { padding: 5px 0; border-top: 1px solid var(--line); }
  .failures .meta { display: flex; gap: 8px; align-items: baseline; color: var(--muted); min-width: 0; }
  .failures time { font-variant-numeric: tabular-nums; }
  .failures .outcome { color: var(--bad); font-weight: 600; }
  .failures .id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 11px;
                  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-width: 0; }
  .failures .error { overflow-wrap: anywhere; }
  .no-failures { color: var(--muted); font-size: 12px; margin: 0; }
  footer { padding: 0 28px 24px; color: var(--muted); font-size: 12px; }
  footer a { color: var(--accent); }
</style>
</head>
<body>
<header>
  <div class="brand">
    <svg width="26" height="26" viewBox="0 0 26 26" aria-hidden="true">
      <rect width="26" height="26" rx="6" fill="#0f766e"/>
      <path d="M4 9c3 0 3 3 6 3s3-3 6-3 3 3 6 3M4 16c3 0 3 3 6 3s3-3 6-3 3 3 6 3" stroke="#fff" stroke-width="2" fill="none" stroke-linecap="round"/>
    </svg>
    Weir <small>live status</small>
  </div>
  <div class="totals">
    <div class="total"><span>functions</span><b id="total-functions">–</b></div>
    <div class="total"><span>events / s</span><b id="total-rate">–</b></div>
    <div class="total"><span>received</span><b id="total-received">–</b></div>
    <div class="total"><span>dead letters</span><b id="total-dead">–</b></div>
  </div>
  <div class="conn" id="conn"><span class="dot"></span><span id="conn-text">connecting…</span></div>
</header>
<main id="functions"><p class="empty" id="empty">Waiting for <code>/v1/functions</code>…</p></main>
<footer>Polls <a href="/v1/functions">/v1/functions</a> and <a href="/metrics">/metrics</a> every second;
  rates are computed from counter deltas, sparklines cover the last two minutes.</footer>
<script>
"use strict";
const POLL_MS = 1000;
const WINDOW_MS = 120000;
const HEALTH_MS = 10000;
const SVG_NS = "http://www.w3.org/2000/svg";
const COUNTERS = [
  ["received", "received"], ["succeeded", "succeeded"], ["failed", "failed"],
  ["retried", "retried"], ["dead_lettered", "dead-lettered"], ["outputs", "outputs"],
];
// name -> { card, samples: [{t, received, lag, rate}] }
const state = new Map();

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function fmtNumber(n) {
  if (!Number.isFinite(n)) return "–";
  return Math.round(n).toLocaleString("en-US");
}

function fmtRate(r) {
  if (r === null || !Number.isFinite(r)) return "–";
  if (r >= 100) return Math.round(r).toLocaleString("en-US");
  if (r >= 10) return r.toFixed(1);
  return r.toFixed(2);
}

// Sum of weir_consumer_lag per function, from the Prometheus text format.
function parseLag(text) {
  const lags = new Map();
  for (const line of text.split("\n")) {
    if (!line.startsWith("weir_consumer_lag{")) continue;
    const m = /^weir_consumer_lag\{([^}]*)\}\s+(\S+)/.exec(line);
    if (!m) continue;
    const fn = /(?:^|,)function="((?:[^"\\]|\\.)*)"/.exec(m[1]);
    const value = Number(m[2]);
    if (!fn || !Number.isFinite(value)) continue;
    lags.set(fn[1], (lags.get(fn[1]) || 0) + value);
  }
  return lags;
}

function buildCard(f) {
  const card = el("section", { class: "fn", "data-function": f.name });
  const head = el("div", { class: "fn-head" }, el("h2", {}, f.name), el("span", { class: "badge ok", "data-field": "health" }, "ok"));
  const route = el("div", { class: "route" });
  const triggers = (f.triggers || []).map((t) => `${t.broker} · ${t.topic}`).join(", ");
  route.append(el("code", {}, triggers || "no trigger"), " → ",
    el("code", {}, (f.outputs || []).join(", ") || "no outputs"),
    " · DLQ ", el("code", {}, f.dead_letter ? f.dead_letter.topic : "–"));
  head.append(route);

  const headline = el("div", { class: "headline" },
    el("div", {}, el("span", {}, "events / s"), el("b", { "data-field": "rate" }, "–")),
    el("div", {}, el("span", {}, "lag"), el("b", { "data-field": "lag" }, "–")),
    el("div", {}, el("span", {}, "instances"), el("b", { "data-field": "instances" }, "–"),
      el("small", { "data-field": "instances-detail" }, ""), el("div", { class: "slots", "data-field": "slots" })));

  const sparks = el("div", { class: "sparks" },
    spark("throughput", "events/s", "rate"), spark("lag", "messages", "lag"));

  const counters = el("dl", { class: "counters" });
  for (const [key, label] of COUNTERS) {
    counters.append(el("div", {}, el("dt", {}, label), el("dd", { "data-counter": key, "data-value": "0" }, "0")));
  }

  const failures = el("div", { "data-field": "failures" });
  card.append(head, headline, sparks, counters, failures);
  return card;
}

function spark(title, unit, key) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 240 46");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("data-spark", key);
  return el("figure", { class: "spark" },
    el("figcaption", {}, `${title} (${unit})`, el("b", { "data-field": `${key}-max` }, "")), svg);
}

function drawSpark(svg, points, color, soft) {
  while (svg.firstChild) svg.firstChild.remove();
  if (points.length < 2) return 0;
  // The x axis spans the history there is, up to the window: a fresh page draws full width.
  const t1 = points[points.length - 1].t;
  const t0 = Math.max(points[0].t, t1 - WINDOW_MS);
  const span = Math.max(1, t1 - t0);
  const max = Math.max(1, ...points.map((p) => p.v));
  const xy = points.map((p) => [((p.t - t0) / span) * 240, 44 - (p.v / max) * 40]);
  const line = xy.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
  const area = document.createElementNS(SVG_NS, "path");
  area.setAttribute("d", `${line}L${xy[xy.length - 1][0].toFixed(1)},46L${xy[0][0].toFixed(1)},46Z`);
  area.setAttribute("fill", soft);
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", line);
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", color);
  path.setAttribute("stroke-width", "1.6");
  path.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(area, path);
  return Math.max(...points.map((p) => p.v));
}

function setField(card, name, text) {
  const node = card.querySelector(`[data-field="${name}"]`);
  if (node && node.textContent !== text) node.textContent = text;
  return node;
}

function update(f, lag, now) {
  let entry = state.get(f.name);
  if (!entry) {
    entry = { card: buildCard(f), samples: [] };
    state.set(f.name, entry);
  }
  const { card, samples } = entry;
  const c = f.counters || {};
  const prev = samples[samples.length - 1];
  const rate = prev && now > prev.t ? Math.max(0, ((c.received || 0) - prev.received) / ((now - prev.t) / 1000)) : null;
  samples.push({ t: now, received: c.received || 0, failed: c.failed || 0, dead_lettered: c.dead_lettered || 0, lag: lag ?? 0, rate });
  while (samples.length && samples[0].t < now - WINDOW_MS) samples.shift();
  entry.rate = rate;

  setField(card, "rate", fmtRate(rate));
  setField(card, "lag", lag === undefined ? "–" : fmtNumber(lag));
  const inst = f.instances || {};
  setField(card, "instances", `${inst.live ?? 0} / ${inst.slots ?? 0}`);
  setField(card, "instances-detail", `busy ${inst.busy ?? 0} · idle ${inst.idle ?? 0} · starts ${fmtNumber(inst.starts ?? 0)}`);
  const slots = card.querySelector('[data-field="slots"]');
  const shown = Math.min(inst.slots ?? 0, 48);
  slots.replaceChildren(...Array.from({ length: shown }, (_, i) =>
    el("span", { class: `slot${i < (inst.busy ?? 0) ? " busy" : i < (inst.live ?? 0) ? " idle" : ""}` })));

  // Health over the last HEALTH_MS, so that the badge does not flicker between polls.
  const since = samples.find((s) => s.t >= now - HEALTH_MS) || samples[0];
  const dead = (c.dead_lettered || 0) > since.dead_lettered;
  const retrying = (c.failed || 0) > since.failed;
  const [label, tone] = f.dead_letter_paused ? ["DLQ paused", "bad"]
    : dead ? ["dead-lettering", "bad"] : retrying ? ["failures", "warn"] : ["ok", "ok"];
  setField(card, "health", label).className = `badge ${tone}`;

  for (const [key] of COUNTERS) {
    const dd = card.querySelector(`[data-counter="${key}"]`);
    const value = c[key] || 0;
    dd.setAttribute("data-value", String(value));
    dd.textContent = fmtNumber(value);
    dd.classList.toggle("hot", (key === "failed" || key === "dead_lettered") && value > 0);
  }

  const rateMax = drawSpark(card.querySelector('[data-spark="rate"]'),
    samples.filter((s) => s.rate !== null).map((s) => ({ t: s.t, v: s.rate })), "var(--accent)", "var(--accent-soft)");
  setField(card, "rate-max", samples.length > 2 ? `max ${fmtRate(rateMax)}` : "");
  const lagMax = drawSpark(card.querySelector('[data-spark="lag"]'),
    samples.map((s) => ({ t: s.t, v: s.lag })), "var(--lag)", "var(--lag-soft)");
  setField(card, "lag-max", samples.length > 2 ? `max ${fmtNumber(lagMax)}` : "");

  renderFailures(card.querySelector('[data-field="failures"]'), f.recent_failures || []);
}

function renderFailures(box, failures) {
  const latest = [...failures].sort((a, b) => String(b.at).localeCompare(String(a.at))).slice(0, 5);
  const key = JSON.stringify(latest);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  if (!latest.length) {
    box.replaceChildren(el("p", { class: "no-failures" }, "No recent failures."));
    return;
  }
  const list = el("ol");
  for (const failure of latest) {
    const when = new Date(failure.at);
    const time = Number.isNaN(when.getTime()) ? String(failure.at) : when.toLocaleTimeString("en-GB", { hour12: false });
    list.append(el("li", { "data-failure": "" },
      el("div", { class: "meta" },
        el("time", { datetime: String(failure.at) }, time),
        el("span", { class: "outcome" }, String(failure.outcome)),
        el("span", { class: "id", title: String(failure.event_id) }, String(failure.event_id))),
      el("div", { class: "error" }, String(failure.error))));
  }
  box.replaceChildren(el("div", { class: "failures" }, el("h3", {}, "latest failures"), list));
}

function render(functions, lags, now) {
  const main = document.getElementById("functions");
  const empty = document.getElementById("empty");
  if (!functions.length) {
    if (empty) empty.textContent = "No functions are configured.";
    return;
  }
  if (empty) empty.remove();
  let totalRate = 0, received = 0, dead = 0, rates = 0;
  for (const f of functions) {
    update(f, lags.get(f.name), now);
    const entry = state.get(f.name);
    if (!entry.card.isConnected) main.append(entry.card);
    if (entry.rate !== null) { totalRate += entry.rate; rates++; }
    received += (f.counters || {}).received || 0;
    dead += (f.counters || {}).dead_lettered || 0;
  }
  document.getElementById("total-functions").textContent = String(functions.length);
  document.getElementById("total-rate").textContent = rates ? fmtRate(totalRate) : "–";
  document.getElementById("total-received").textContent = fmtNumber(received);
  document.getElementById("total-dead").textContent = fmtNumber(dead);
}

function setConnection(ok, detail) {
  const conn = document.getElementById("conn");
  conn.className = `conn ${ok ? "live" : "down"}`;
  document.getElementById("conn-text").textContent = ok
    ? `live · ${new Date().toLocaleTimeString("en-GB", { hour12: false })}`
    : `disconnected: ${detail}`;
}

async function poll() {
  try {
    const [functions, metrics] = await Promise.all([
      fetch("/v1/functions", { cache: "no-store" }),
      fetch("/metrics", { cache: "no-store" }).catch(() => null),
    ]);
    if (!functions.ok) throw new Error(`GET /v1/functions answered ${functions.status}`);
    const body = await functions.json();
    const lags = metrics && metrics.ok ? parseLag(await metrics.text()) : new Map();
    render(body.functions || [], lags, Date.now());
    setConnection(true);
  } catch (e) {
    setConnection(false, e.message || String(e));
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for forbidden in ["<script src", "<link ", "http://", "https://", "@import"] {
            // The SVG namespace URI is an identifier, not a fetch.
            let uses = PAGE.matches(forbidden).count()
                - PAGE.matches("http://www.w3.org/2000/svg").count()
                    * usize::from(forbidden == "http://");
            assert_eq!(
                uses, 0,
                "the page must not load {forbidden:?} from elsewhere"
            );
        }
        assert!(PAGE.contains(r#"fetch("/v1/functions""#));
        assert!(PAGE.contains("weir_consumer_lag"));
    }
}
