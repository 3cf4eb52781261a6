// Flowcraft console: pages built from the JSON API. Every value from the server is put in the page as text
// (textContent, attributes), never as HTML. The action token lives in sessionStorage and is sent in the
// Authorization header (never in a cookie), so a page on another site cannot act with it.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STATES = ["pending", "running", "waiting", "done", "skipped", "failed"];
const STATE_HELP = {
  pending: "not reached yet",
  running: "its job is queued or executing (derived: the node may go and has no result yet)",
  waiting: "waiting for an outside event",
  done: "executed", skipped: "not reached: every incoming edge was skipped", failed: "failed after all attempts",
};
const RUN_STATUSES = ["running", "awaiting", "completed", "failed", "cancelled"];
// A run that can still change: polled, and cancellable.
function live(status) { return status === "running" || status === "awaiting"; }
let timer = null;
let config = { actions: false };

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function token() { return sessionStorage.getItem("flowcraft-token") || ""; }

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.method && opts.method !== "GET" && token()) opts.headers["Authorization"] = "Bearer " + token();
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) {
    const err = new Error((body && body.error) || res.statusText || "request failed");
    err.status = res.status;
    throw err;
  }
  return body;
}

function toast(message, isError) {
  const t = document.getElementById("toast");
  t.textContent = message;
  t.className = isError ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

function fmtTime(s) { return s ? new Date(s).toLocaleString() : "—"; }

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  const m = Math.floor(s / 60), r = Math.round(s % 60);
  if (m < 60) return m + " min " + r + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

function badge(state) { return el("span", { class: "badge " + state, "data-status": state, text: state }); }

function progress(resolved, total) {
  const t = total === null || total === undefined ? "?" : total;
  const bar = el("span");
  bar.style.width = total ? Math.min(100, Math.round((100 * resolved) / total)) + "%" : "0%";
  return el("div", { class: "progress" }, el("div", { class: "bar" }, bar), el("span", { text: resolved + "/" + t }));
}

function runLink(id) { return el("a", { href: "/runs/" + encodeURIComponent(id), class: "mono", text: id }); }
function blueprintLink(id) { return el("a", { href: "/blueprints/" + encodeURIComponent(id), text: id }); }

function setMain(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function stopPolling() { if (timer) { clearTimeout(timer); timer = null; } }

// ---------------------------------------------------------------------------------------------------------------
// Runs list
// ---------------------------------------------------------------------------------------------------------------

async function runsPage(fixedBlueprint, container) {
  const params = new URLSearchParams(location.search);
  const status = params.get("status") || "";
  const blueprint = fixedBlueprint || params.get("blueprint") || "";
  const before = params.get("before") || "";
  const q = new URLSearchParams();
  if (status) q.set("status", status);
  if (blueprint) q.set("blueprint", blueprint);
  if (before) q.set("before", before);
  const data = await api("/api/runs?" + q.toString());

  const link = (changes) => {
    const p = new URLSearchParams(location.search);
    for (const [k, v] of Object.entries(changes)) { if (v) p.set(k, v); else p.delete(k); }
    const s = p.toString();
    return location.pathname + (s ? "?" + s : "");
  };
  const total = Object.values(data.counts).reduce((a, b) => a + b, 0);
  const chips = el("div", { class: "chips" },
    el("a", { class: "chip" + (status ? "" : " active"), href: link({ status: "", before: "" }), text: "all " + total }),
    RUN_STATUSES.map((s) => el("a", { class: "chip" + (status === s ? " active" : ""), href: link({ status: s, before: "" }),
      "data-filter": s, text: s + " " + (data.counts[s] || 0) })));

  const filters = el("form", { class: "filters", onsubmit: (ev) => {
    ev.preventDefault();
    const b = ev.target.querySelector("input[name=blueprint]");
    navigate(link({ blueprint: b ? b.value.trim() : "", before: "" }));
  } });
  if (!fixedBlueprint) {
    filters.append(el("input", { name: "blueprint", placeholder: "blueprint id", value: blueprint, maxlength: 256 }),
      el("button", { type: "submit", text: "Filter" }));
    if (blueprint) filters.append(el("a", { href: link({ blueprint: "", before: "" }), text: "clear" }));
  }

  const rows = data.runs.map((r) => el("tr", { "data-run-id": r.runId, "data-status": r.status },
    el("td", {}, runLink(r.runId)),
    el("td", {}, blueprintLink(r.blueprintId), r.blueprintVersion ? el("span", { class: "muted", text: " v" + r.blueprintVersion }) : null),
    el("td", {}, badge(r.status)),
    el("td", { text: fmtTime(r.createdAt) }),
    el("td", { text: fmtDuration(r.durationMs) }),
    el("td", {}, progress(r.resolved, r.total))));
  const table = el("table", { id: "runs" },
    el("thead", {}, el("tr", {}, ["Run", "Blueprint", "Status", "Started", "Duration", "Progress"].map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No runs." }))));
  const pager = el("div", { class: "pager" },
    before ? el("a", { href: link({ before: "" }), text: "← newest" }) : null,
    data.next ? el("a", { id: "older", href: link({ before: data.next }), text: "older →" }) : null);
  const parts = [chips, filters, table, pager];
  if (container) container.replaceChildren(...parts);
  else setMain(el("h1", { text: "Runs" }), ...parts);
  if (!before) timer = setTimeout(() => route(true), 4000);
}

// ---------------------------------------------------------------------------------------------------------------
// Graph
// ---------------------------------------------------------------------------------------------------------------

function drawGraph(graph, nodes, onSelect) {
  const s = svg("svg", { class: "dag", width: graph.width, height: graph.height,
    viewBox: "0 0 " + graph.width + " " + graph.height, role: "img", "aria-label": "workflow graph" });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#94a3b8" }));
  defs.append(marker);
  s.append(defs);
  for (const e of graph.edges) {
    const p = e.points;
    let d = "M" + p[0].x + "," + p[0].y;
    for (let i = 1; i < p.length; i++) {
      const a = p[i - 1], b = p[i], mx = (a.x + b.x) / 2;
      d += " C" + mx + "," + a.y + " " + mx + "," + b.y + " " + b.x + "," + b.y;
    }
    const path = svg("path", { class: "edge " + e.kind, d, "marker-end": "url(#arrow)",
      "data-source": e.source, "data-target": e.target });
    const title = svg("title");
    title.textContent = e.source + " → " + e.target + (e.label ? " (" + e.label + ")" : "");
    path.append(title);
    s.append(path);
  }
  for (const n of graph.nodes) {
    const info = nodes ? nodes[n.id] : null;
    const state = info ? info.state : "plain";
    const g = svg("g", { class: "node " + state, "data-node-id": n.id, "data-state": state,
      transform: "translate(" + n.x + "," + n.y + ")", tabindex: 0 });
    g.append(svg("rect", { width: graph.nodeWidth, height: graph.nodeHeight, rx: 6, ry: 6 }));
    const name = svg("text", { x: 10, y: 17 });
    name.textContent = n.id.length > 22 ? n.id.slice(0, 21) + "…" : n.id;
    const uses = svg("text", { class: "uses", x: 10, y: 31 });
    g.setAttribute("data-uses", n.uses);
    uses.textContent = usesLine(n.uses, info);
    const title = svg("title");
    title.textContent = n.id + " (" + n.uses + ")" + (info ? ": " + info.state : "");
    g.append(name, uses, title);
    if (onSelect) {
      g.addEventListener("click", () => onSelect(n.id));
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter") onSelect(n.id); });
    }
    s.append(g);
  }
  return s;
}

// "×5 · 3 done 2 running" for a node with instances (a loop's or a batch's), from the run API's counts.
function instanceText(instances) {
  if (!instances) return "";
  const entries = Object.entries(instances);
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  return "×" + total + " · " + entries.map(([status, n]) => n + " " + status).join(" ");
}

function usesLine(uses, info) {
  const parts = [uses];
  if (info && info.instances) parts.push(instanceText(info.instances));
  else if (info && info.attempts > 1) parts.push(info.attempts + " attempts");
  return parts.join(" · ");
}

function graphBox(graph, nodes, onSelect) {
  const drawing = drawGraph(graph, nodes, onSelect);
  const scroll = el("div", { class: "graph-scroll" }, drawing);
  let scale = 1;
  const apply = () => {
    drawing.setAttribute("width", Math.max(1, Math.round(graph.width * scale)));
    drawing.setAttribute("height", Math.max(1, Math.round(graph.height * scale)));
  };
  const fit = () => {
    const w = scroll.clientWidth || 900;
    scale = Math.max(0.25, Math.min(1, (w - 4) / graph.width));
    apply();
  };
  const legend = el("div", { class: "legend" }, nodes ? STATES.map((st) => {
    const i = el("i");
    i.style.background = getComputedStyle(document.documentElement).getPropertyValue("--" + st) || "#ccc";
    return el("span", { title: STATE_HELP[st] }, i, st);
  }) : null);
  const tools = el("div", { class: "graph-tools" },
    el("button", { type: "button", onclick: () => { scale = Math.min(2, scale * 1.25); apply(); }, text: "+" }),
    el("button", { type: "button", onclick: () => { scale = Math.max(0.1, scale / 1.25); apply(); }, text: "−" }),
    el("button", { type: "button", onclick: fit, text: "fit" }),
    el("button", { type: "button", onclick: () => { scale = 1; apply(); }, text: "100%" }),
    el("span", { class: "muted", text: graph.nodes.length + " nodes" }),
    legend);
  const box = el("div", { class: "graph-box" }, tools, scroll);
  requestAnimationFrame(fit);
  return box;
}

function updateGraph(nodes) {
  for (const g of document.querySelectorAll("svg.dag g.node")) {
    const info = nodes[g.getAttribute("data-node-id")];
    if (!info) continue;
    const selected = g.classList.contains("selected");
    g.setAttribute("class", "node " + info.state + (selected ? " selected" : ""));
    g.setAttribute("data-state", info.state);
    const uses = g.querySelector("text.uses");
    if (uses) uses.textContent = usesLine(g.getAttribute("data-uses") || "", info);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A run
// ---------------------------------------------------------------------------------------------------------------

function runMeta(run) {
  const item = (label, value) => el("div", {}, el("span", { text: label }), value instanceof Node ? value : el("span", { text: value }));
  return el("div", { class: "meta", id: "run-meta" },
    item("Blueprint", el("span", {}, blueprintLink(run.blueprintId), run.blueprintVersion ? " v" + run.blueprintVersion : "")),
    item("Started", fmtTime(run.createdAt)),
    item(run.endedAt ? "Ended" : "Last activity", fmtTime(run.endedAt || run.updatedAt)),
    item("Duration", fmtDuration(run.durationMs)),
    item("Progress", progress(run.resolved, run.total)));
}

async function runPage(runId, refresh) {
  const data = await api("/api/runs/" + encodeURIComponent(runId));
  const run = data.run;
  if (refresh && document.getElementById("run-page") && document.getElementById("run-page").dataset.runId === runId) {
    updateGraph(data.nodes);
    document.getElementById("run-status").replaceChildren(badge(run.status));
    document.getElementById("run-meta").replaceWith(runMeta(run));
    const err = document.getElementById("run-error");
    err.hidden = !run.error;
    err.textContent = run.error || "";
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.hidden = !live(run.status);
    if (state.selected) showNode(runId, state.selected, false, true);
  } else {
    const cancel = el("button", { id: "cancel", class: "danger", type: "button", hidden: !live(run.status),
      title: config.actions ? "cancel this run (needs the action token)" : "actions are disabled on this console",
      onclick: () => cancelRun(runId) }, "Cancel run");
    const head = el("h1", {}, el("span", { text: "Run " }), el("span", { class: "mono", text: runId }),
      el("span", { id: "run-status" }, badge(run.status)), cancel);
    const error = el("div", { id: "run-error", class: "error-box", hidden: !run.error, text: run.error || "" });
    const notes = [];
    if (data.blueprint.problem) notes.push(el("div", { class: "notice", text: data.blueprint.problem }));
    else if (!data.blueprint.exactVersion) notes.push(el("div", { class: "notice",
      text: "The definition of this run's blueprint version is not stored; the graph shows the latest definition of " + data.blueprint.id + "." }));
    const detail = el("aside", { class: "detail", id: "detail" }, el("p", { class: "muted", text: "Click a node to see its input, output, error, attempts and timings." }));
    const body = data.graph
      ? el("div", { class: "run-layout" }, graphBox(data.graph, data.nodes, (id) => showNode(runId, id, false)), detail)
      : el("div", { class: "run-layout" }, nodeTable(runId, data.nodes), detail);
    const page = el("div", { id: "run-page" }, head, error, runMeta(run), ...notes, body);
    page.dataset.runId = runId;
    state.selected = null;
    setMain(page);
  }
  if (live(run.status)) timer = setTimeout(() => route(true), 1000);
}

function nodeTable(runId, nodes) {
  return el("table", {}, el("tbody", {}, Object.entries(nodes).map(([id, n]) =>
    el("tr", {}, el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showNode(runId, id, false); }, text: id })),
      el("td", {}, badge(n.state)), el("td", { text: "attempts " + n.attempts }),
      el("td", { class: "instances", text: instanceText(n.instances) })))));
}

const state = { selected: null };

function valueBlock(label, view, runId, nodeId, id) {
  if (!view) return [el("div", { class: "section", text: label }), el("p", { class: "muted", text: "—" })];
  const text = view.truncated ? view.preview + "\n…" : JSON.stringify(view.value, null, 2);
  const head = el("div", { class: "section" }, el("span", { text: label }),
    view.truncated ? el("a", { href: "#", class: "show-all", onclick: (ev) => { ev.preventDefault(); showNode(runId, nodeId, true); },
      text: "show all (" + Math.ceil(view.bytes / 1024) + " KiB)" }) : null);
  return [head, el("pre", { id, text })];
}

async function showNode(runId, nodeId, full, quiet) {
  state.selected = nodeId;
  for (const g of document.querySelectorAll("svg.dag g.node")) {
    g.classList.toggle("selected", g.getAttribute("data-node-id") === nodeId);
  }
  const panel = document.getElementById("detail");
  if (!panel) return;
  let n;
  try {
    n = await api("/api/runs/" + encodeURIComponent(runId) + "/nodes/" + encodeURIComponent(nodeId) + (full ? "?full=1" : ""));
  } catch (e) {
    if (!quiet) panel.replaceChildren(el("div", { class: "error-box", text: e.message }));
    return;
  }
  if (quiet && panel.dataset.full === "1" && panel.dataset.node === nodeId) return;
  // A refresh keeps an open resume form (and what is typed in it) while its node still waits.
  if (quiet && n.state === "waiting" && panel.dataset.node === nodeId && document.getElementById("resume")) return;
  panel.dataset.full = full ? "1" : "";
  panel.dataset.node = nodeId;
  const dl = el("dl", {},
    el("dt", { text: "uses" }), el("dd", { class: "mono", text: n.uses || "—" }),
    el("dt", { text: "attempts" }), el("dd", { text: n.attempts }),
    el("dt", { text: "action" }), el("dd", { class: "mono", text: n.action || "—" }),
    el("dt", { text: "took edges to" }), el("dd", { class: "mono", text: n.taken.length ? n.taken.join(", ") : "—" }),
    el("dt", { text: "finished" }), el("dd", { text: fmtTime(n.finishedAt) }),
    el("dt", { text: "after run start" }), el("dd", { text: fmtDuration(n.sinceRunStartMs) }));
  panel.replaceChildren(...[
    el("h2", {}, el("span", { class: "mono", text: n.nodeId }), badge(n.state)),
    el("p", { class: "muted", text: STATE_HELP[n.state] || "" }),
    dl,
    n.error ? [el("div", { class: "section", text: "Error" }), el("pre", { id: "detail-error", text: n.error })] : [],
    valueBlock("Input (recomputed from the recorded predecessors)", n.input, runId, nodeId, "detail-input"),
    valueBlock("Output", n.output, runId, nodeId, "detail-output"),
    n.state === "waiting" ? resumeForm(runId, nodeId) : []].flat());
}

// The resume form of a waiting node: an optional result (JSON) and action, sent with the action token.
function resumeForm(runId, nodeId) {
  const result = el("textarea", { id: "resume-result", rows: 3, placeholder: "result (JSON, optional)" });
  const action = el("input", { id: "resume-action", type: "text", placeholder: "action (optional)" });
  const button = el("button", { id: "resume", type: "button",
    title: config.actions ? "resume this waiting node (needs the action token)" : "actions are disabled on this console",
    onclick: () => resumeNode(runId, nodeId, result.value, action.value) }, "Resume node");
  return [el("div", { class: "section", text: "Resume" }), el("div", { class: "resume-form" }, result, action, button)];
}

async function resumeNode(runId, nodeId, resultText, action) {
  if (!config.actions) { toast("Refused: actions are disabled on this console (no FLOWCRAFT_UI_TOKEN).", true); return; }
  const body = {};
  if (resultText.trim()) {
    try { body.result = JSON.parse(resultText); } catch (e) { toast("The result is not valid JSON: " + e.message, true); return; }
  }
  if (action.trim()) body.action = action.trim();
  try {
    await api("/api/runs/" + encodeURIComponent(runId) + "/nodes/" + encodeURIComponent(nodeId) + "/resume",
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    toast("Node resumed.");
  } catch (e) {
    toast("Refused (" + (e.status || "error") + "): " + e.message, true);
  }
  stopPolling();
  route(true);
}

async function cancelRun(runId) {
  if (!config.actions) { toast("Refused: actions are disabled on this console (no FLOWCRAFT_UI_TOKEN).", true); return; }
  try {
    await api("/api/runs/" + encodeURIComponent(runId) + "/cancel", { method: "POST" });
    toast("Run cancelled.");
  } catch (e) {
    toast("Refused (" + (e.status || "error") + "): " + e.message, true);
  }
  stopPolling();
  route(true);
}

// ---------------------------------------------------------------------------------------------------------------
// Blueprints
// ---------------------------------------------------------------------------------------------------------------

async function blueprintsPage() {
  const data = await api("/api/blueprints");
  const rows = data.blueprints.map((b) => el("tr", { "data-blueprint-id": b.id },
    el("td", {}, blueprintLink(b.id)), el("td", { text: b.version || "—" }),
    el("td", { text: b.nodes === null || b.nodes === undefined ? "—" : b.nodes }),
    el("td", { text: b.source }), el("td", { text: fmtTime(b.firstSeen) })));
  setMain(el("h1", { text: "Blueprints" }), el("table", { id: "blueprints" },
    el("thead", {}, el("tr", {}, ["Blueprint", "Version", "Nodes", "Definition from", "First seen"].map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No blueprints stored yet." })))));
}

async function blueprintPage(id) {
  const data = await api("/api/blueprints/" + encodeURIComponent(id));
  const b = data.blueprint;
  const runs = el("div", { id: "blueprint-runs" });
  setMain(
    el("h1", {}, el("span", { text: "Blueprint " }), el("span", { class: "mono", text: b.id }),
      b.version ? el("span", { class: "muted", text: "v" + b.version }) : null),
    b.problem ? el("div", { class: "notice", text: b.problem }) : null,
    data.graph ? el("div", { class: "run-layout wide" }, graphBox(data.graph, null, null)) : null,
    el("h2", { text: "Runs" }), runs);
  await runsPage(id, runs);
}

// ---------------------------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------------------------

async function route(refresh) {
  stopPolling();
  const path = location.pathname;
  for (const a of document.querySelectorAll("header nav a")) {
    const nav = a.getAttribute("data-nav");
    a.classList.toggle("active", nav === "blueprints" ? path.startsWith("/blueprints") : !path.startsWith("/blueprints"));
  }
  try {
    let m;
    if ((m = path.match(/^\/runs\/([^/]+)$/))) await runPage(decodeURIComponent(m[1]), refresh);
    else if ((m = path.match(/^\/blueprints\/([^/]+)$/))) await blueprintPage(decodeURIComponent(m[1]));
    else if (path === "/blueprints") await blueprintsPage();
    else await runsPage(null, null);
  } catch (e) {
    if (!refresh) setMain(el("div", { class: "error-box", text: (e.status ? e.status + ": " : "") + e.message }));
    else timer = setTimeout(() => route(true), 3000);
  }
}

function navigate(href) {
  history.pushState(null, "", href);
  route(false);
}

function showTokenState() {
  const s = document.getElementById("token-state");
  if (!config.actions) s.textContent = "read-only console";
  else s.textContent = token() ? "token set" : "no token";
}

document.addEventListener("DOMContentLoaded", async () => {
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest ? ev.target.closest("a[href]") : null;
    if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
    const href = a.getAttribute("href");
    if (!href.startsWith("/") || href.startsWith("//")) return;
    ev.preventDefault();
    navigate(href);
  });
  window.addEventListener("popstate", () => route(false));
  document.getElementById("token-save").addEventListener("click", () => {
    const input = document.getElementById("token-input");
    if (input.value) sessionStorage.setItem("flowcraft-token", input.value);
    input.value = "";
    showTokenState();
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem("flowcraft-token");
    showTokenState();
  });
  try { config = await api("/api/config"); } catch (_) { /* read-only */ }
  showTokenState();
  route(false);
});
