// Live page: polls the ops app's JSON endpoints and redraws. No dependencies, no external assets.
"use strict";

const POLL_MS = 1500;
const WATERFALL_TURNS = 12;
// lk_observe's components and the guide's budget, written into the page by the ops app
const CONFIG = JSON.parse(document.getElementById("page-config").textContent);
const COMPONENT_ORDER = CONFIG.components;
const STAGE_ORDER = CONFIG.stages; // every bar the waterfall draws: components and tool time
const BUDGET_MS = CONFIG.budget_ms; // upper end per component (e2e: the total); null: none
const BREAKDOWN_TITLES = CONFIG.breakdown_titles; // e2e's parts, in order -> title
const PART_ORDER = Object.keys(BREAKDOWN_TITLES);
const BREAKDOWN_TURNS = 12;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // textContent only: never parse data as HTML
  return node;
}

function ms(value) {
  return typeof value === "number" && isFinite(value) ? String(Math.round(value)) : "–";
}

function pct(value, digits) {
  return typeof value === "number" && isFinite(value) ? (value * 100).toFixed(digits) + "%" : "–";
}

function byComponentOrder(a, b) {
  const ia = COMPONENT_ORDER.indexOf(a);
  const ib = COMPONENT_ORDER.indexOf(b);
  return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
}

// A later LLM round (after a tool call) is drawn as the LLM; anything unknown in grey.
function stageOf(name) {
  return name.startsWith("llm_round_") ? "llm_ttft" : name;
}

function byStageOrder(a, b) {
  const ia = STAGE_ORDER.indexOf(stageOf(a));
  const ib = STAGE_ORDER.indexOf(stageOf(b));
  return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
}

// Relative: the page works wherever the app is mounted (create_app() under a prefix).
async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(path + " " + response.status);
  return response.json();
}

function renderLatency(stats) {
  const body = document.getElementById("latency-body");
  const components = Object.keys(stats).sort(byComponentOrder);
  body.replaceChildren();
  if (components.length === 0) {
    const row = el("tr", "empty");
    const cell = el("td", null, "no turns yet");
    cell.colSpan = 7;
    row.append(cell);
    body.append(row);
    return;
  }
  for (const component of components) {
    const s = stats[component];
    const row = el("tr");
    row.dataset.component = component;
    row.append(el("td", "component", component));
    row.append(el("td", "num count", String(s.count)));
    const budget = BUDGET_MS[component];
    for (const key of ["median", "p95", "p99", "max"]) {
      const cell = el("td", "num " + (key === "median" ? "p50" : key), ms(s[key]));
      if (typeof budget === "number" && key === "p95" && s.count > 0 && s[key] > budget) {
        cell.classList.add("over");
      }
      row.append(cell);
    }
    row.append(el("td", "num budget-ms", typeof budget === "number" ? String(budget) : "–"));
    body.append(row);
  }
}

function renderTiers(turns) {
  const counts = { excellent: 0, good: 0, slow: 0 };
  const strip = document.getElementById("tier-strip");
  strip.replaceChildren();
  for (const turn of turns) {
    if (turn.kind !== "user" || !turn.tier) continue;
    counts[turn.tier] += 1;
    const chip = el("span", "chip " + turn.tier);
    chip.title = "#" + turn.index + " " + turn.tier + " " + ms(turn.latency_ms.e2e) + " ms";
    strip.append(chip);
  }
  for (const tier of Object.keys(counts)) {
    document.getElementById("tier-" + tier).textContent = String(counts[tier]);
  }
  renderBargeIn(turns);
}

// Replies the caller cut short, before or after their first audio, among the recent replies.
function renderBargeIn(turns) {
  const replies = turns.filter((turn) => turn.kind === "user");
  const cut = replies.filter((turn) => turn.interrupted).length;
  const node = document.getElementById("barge-in");
  node.dataset.cut = String(cut);
  node.dataset.replies = String(replies.length);
  node.textContent = replies.length === 0
    ? "barge-in rate: no replies yet"
    : "barge-in rate " + pct(cut / replies.length, 0) + " (" + cut + " of " + replies.length
      + " recent replies cut short)";
}

function renderLegend() {
  const legend = document.getElementById("legend");
  if (legend.childElementCount) return;
  for (const stage of STAGE_ORDER) {
    const item = el("span");
    item.dataset.stage = stage;
    const swatch = el("span", "swatch");
    swatch.style.background = "var(--" + stage + ")";
    item.append(swatch, stage);
    legend.append(item);
  }
}

// Bars from the turn's stages (real start/end); without stages, each latency from 0.
function bars(turn) {
  const stages = Object.entries(turn.stages || {});
  if (stages.length) return stages.map(([name, [start, end]]) => ({ name, start, end }));
  return Object.entries(turn.latency_ms).map(([name, value]) => ({ name, start: 0, end: value }));
}

function renderWaterfall(turns) {
  renderLegend();
  const rows = document.getElementById("waterfall-rows");
  const recent = turns.slice(-WATERFALL_TURNS).reverse();
  rows.replaceChildren();
  if (recent.length === 0) {
    rows.append(el("p", "empty", "no turns yet"));
    return;
  }
  const laid = recent.map((turn) => ({ turn, bars: bars(turn).sort((a, b) => byStageOrder(a.name, b.name)) }));
  const span = Math.max(1, ...laid.flatMap(({ bars }) => bars.map((b) => b.end)));
  for (const { turn, bars: turnBars } of laid) {
    const row = el("div", "wf-row");
    row.dataset.index = String(turn.index);
    const e2e = turn.latency_ms.e2e;
    const what = turn.interrupted ? "interrupted" : turn.kind === "agent" ? "greeting" : turn.tier || turn.kind;
    const label = "#" + turn.index + " " + what + (e2e === undefined ? "" : " " + ms(e2e) + " ms");
    row.append(el("div", "wf-label", label));
    const track = el("div", "wf-track");
    turnBars.forEach((bar, i) => {
      const node = el("div", "wf-bar " + stageOf(bar.name));
      node.dataset.stage = bar.name;
      node.style.left = (100 * Math.max(0, bar.start) / span) + "%";
      node.style.width = (100 * Math.max(0, bar.end - bar.start) / span) + "%";
      node.style.top = (1 + (i % 5) * 4) + "px";
      node.style.background = "var(--" + stageOf(bar.name) + ", var(--muted))";
      node.title = bar.name + " " + ms(bar.end - bar.start) + " ms";
      track.append(node);
    });
    row.append(track);
    rows.append(row);
  }
}

function partSwatch(part) {
  const swatch = el("span", "swatch");
  swatch.style.background = "var(--bd-" + part + ", var(--muted))";
  return swatch;
}

function renderBreakdownLegend() {
  const legend = document.getElementById("bd-legend");
  if (legend.childElementCount) return;
  for (const part of PART_ORDER) {
    const item = el("span");
    item.dataset.part = part;
    item.title = BREAKDOWN_TITLES[part];
    item.append(partSwatch(part), part);
    legend.append(item);
  }
}

// One stacked bar: e2e's parts side by side, in order, scaled so `span` ms fill the track.
function breakdownRow(label, parts, settings, span) {
  const row = el("div", "wf-row bd-row");
  row.append(el("div", "wf-label", label));
  const track = el("div", "bd-track");
  for (const part of PART_ORDER) {
    const value = parts[part];
    if (typeof value !== "number" || !(value > 0)) continue; // absent, or hidden (0)
    const seg = el("div", "bd-seg");
    seg.dataset.part = part;
    seg.style.width = (100 * value / span) + "%";
    seg.style.background = "var(--bd-" + part + ", var(--muted))";
    const owner = settings && settings[part] ? " (" + settings[part] + ")" : "";
    seg.title = (BREAKDOWN_TITLES[part] || part) + ": " + ms(value) + " ms" + owner;
    track.append(seg);
  }
  row.append(track);
  return row;
}

function renderBreakdown(turns, summary) {
  renderBreakdownLegend();
  const rows = document.getElementById("bd-rows");
  const recent = turns.filter((turn) => turn.breakdown_ms && Object.keys(turn.breakdown_ms).length)
    .slice(-BREAKDOWN_TURNS).reverse();
  const mean = summary.mean;
  rows.replaceChildren();
  if (recent.length === 0) {
    rows.append(el("p", "empty", "no turns yet"));
  } else {
    const total = (turn) => Object.values(turn.breakdown_ms).reduce((a, b) => a + b, 0);
    const span = Math.max(1, ...recent.map(total), mean.e2e_ms || 0);
    const meanParts = Object.fromEntries(mean.parts.map((p) => [p.part, p.mean_ms]));
    const meanSettings = Object.fromEntries(mean.parts.map((p) => [p.part, p.setting]));
    const meanRow = breakdownRow("mean of " + mean.turns + " · " + ms(mean.e2e_ms) + " ms",
      meanParts, meanSettings, span);
    meanRow.classList.add("bd-mean-row");
    rows.append(meanRow);
    for (const turn of recent) {
      const row = breakdownRow("#" + turn.index + " " + ms(total(turn)) + " ms",
        turn.breakdown_ms, turn.breakdown_settings, span);
      row.dataset.index = String(turn.index);
      rows.append(row);
    }
  }
  const body = document.getElementById("bd-mean-body");
  body.replaceChildren();
  if (!mean.parts.length) {
    const row = el("tr", "empty");
    const cell = el("td", null, "no turns yet");
    cell.colSpan = 4;
    row.append(cell);
    body.append(row);
    return;
  }
  for (const p of mean.parts) {
    const row = el("tr");
    row.dataset.part = p.part;
    const title = el("td", "bd-title");
    title.append(partSwatch(p.part), p.title);
    title.title = p.part;
    row.append(title);
    row.append(el("td", "num mean", ms(p.mean_ms)));
    row.append(el("td", "num share", mean.e2e_ms > 0 ? pct(p.mean_ms / mean.e2e_ms, 0) : "–"));
    row.append(el("td", "setting", p.setting || ""));
    body.append(row);
  }
}

function renderProviders(providers) {
  const body = document.getElementById("providers-body");
  body.replaceChildren();
  if (!providers.length) {
    const row = el("tr", "empty");
    const cell = el("td", null, "no provider named yet");
    cell.colSpan = 5;
    row.append(cell);
    body.append(row);
    return;
  }
  // the fastest p50 of each component that has more than one provider
  const best = {};
  const seen = {};
  for (const p of providers) {
    seen[p.component] = (seen[p.component] || 0) + 1;
    if (!(p.component in best) || p.p50_ms < best[p.component]) best[p.component] = p.p50_ms;
  }
  let previous = null;
  for (const p of providers) {
    const row = el("tr");
    row.dataset.component = p.component;
    row.dataset.provider = p.provider;
    row.dataset.model = p.model;
    const name = el("td", "component", p.component === previous ? "" : p.component);
    name.title = p.title;
    row.append(name);
    row.append(el("td", "model", p.provider + " / " + p.model));
    row.append(el("td", "num turns", String(p.turns)));
    const p50 = el("td", "num p50", ms(p.p50_ms));
    if (seen[p.component] > 1 && p.p50_ms === best[p.component]) p50.classList.add("best");
    row.append(p50);
    row.append(el("td", "num p95", ms(p.p95_ms)));
    body.append(row);
    previous = p.component;
  }
}

// Past zero the budget is spent: "-1614%" left says nothing the burn rate does not say better.
function budgetLeft(remaining) {
  if (typeof remaining !== "number" || !isFinite(remaining)) return "budget left –";
  return remaining <= 0 ? "budget exhausted" : "budget left " + pct(remaining, 1);
}

function renderSlos(statuses) {
  const cards = document.getElementById("slo-cards");
  cards.replaceChildren();
  if (!statuses.length) {
    cards.append(el("p", "empty", "no SLOs"));
    return;
  }
  for (const s of statuses) {
    const card = el("div", "slo-card");
    card.dataset.slo = s.name;
    const head = el("div", "slo-head");
    head.append(el("span", "slo-name", s.name));
    // "breaching" is the evaluator's verdict (burn rate past its alert factor, enough traffic);
    // a window that merely overspent is worth a warning, not a page
    const badge = s.turns === 0 ? ["pill pill-unknown", "no traffic"]
      : s.breaching ? ["pill pill-bad", "breaching"]
      : s.error_budget_remaining !== null && s.error_budget_remaining <= 0 ? ["pill pill-warn", "over budget"]
      : ["pill pill-ok", "ok"];
    head.append(el("span", badge[0], badge[1]));
    card.append(head);
    card.append(el("div", "slo-facts",
      s.component + " ≤ " + ms(s.threshold_ms) + " ms for " + pct(s.objective, 1) + " of turns · " +
      "compliance " + pct(s.compliance, 2) + " (" + s.good_turns + "/" + s.turns + ") · " +
      "burn " + (typeof s.burn_rate === "number" ? s.burn_rate.toFixed(2) + "×" : "–") + " · " +
      budgetLeft(s.error_budget_remaining)));
    const budget = el("div", "budget");
    const left = typeof s.error_budget_remaining === "number" ? s.error_budget_remaining : 1;
    const fill = el("div", "budget-fill" + (left <= 0 ? " out" : left < 0.25 ? " low" : ""));
    fill.style.width = (100 * Math.min(1, Math.max(0, left))) + "%";
    budget.append(fill);
    card.append(budget);
    cards.append(card);
  }
}

function renderReady(ready) {
  const pill = document.getElementById("ready");
  pill.className = "pill " + (ready.ready ? "pill-ok" : "pill-bad");
  pill.textContent = ready.ready ? "ready" : "not ready: " + ready.failing.join(", ");
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const [stats, turns, breakdown, slos, ready] = await Promise.all([
      getJSON("metrics/latency"), getJSON("turns/recent"), getJSON("turns/breakdown"), getJSON("slo"),
      getJSON("ready?report=1"),
    ]);
    renderLatency(stats);
    renderTiers(turns);
    renderWaterfall(turns);
    renderBreakdown(turns, breakdown);
    renderProviders(breakdown.providers);
    renderSlos(slos);
    renderReady(ready);
    updated.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "true";
  } catch (err) {
    // shown to the person watching, not thrown: the next poll may well succeed
    updated.textContent = "update failed: " + err.message;
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", refresh);
