// The williw worker's dashboard page (index.html), served by williw.worker.dashboard; no build step.
//
// What the script does, and why:
// * It polls the read endpoints (``/healthz``, ``/api/nodes``, ``/api/requests``, the selected request and its
//   picture ``/api/plans/{id}.svg``) every ``?poll=`` ms (default 2000) with ``setTimeout``, never reloading.
// * Between polls it ages each node's heartbeat locally from the server's ``heartbeat_age_s`` (not the browser's
//   clock, which may be skewed against the worker's), so a node turns offline on the page when its TTL runs out.
// * Optional endpoints of later issues are probed and left out when absent: a request's assignments
//   (``/api/requests/{id}/assignments``, node states ``assigned → pulling → ready | failed``) and its plan versions
//   with a migration (``/api/requests/{id}/plans``, drawn by migration.js, loaded before this file).
// * With a token on the worker, it asks for the token once, keeps it in ``sessionStorage`` (gone with the tab) and
//   sends it as ``Authorization: Bearer``. All data reaches the DOM through ``textContent``; the SVG is parsed
//   as XML and only an ``<svg>`` root is inserted.
"use strict";
const params = new URLSearchParams(location.search);
const POLL_MS = Math.min(60000, Math.max(250, Number(params.get("poll")) || 2000));
const TOKEN_KEY = "williw-token";
const state = { ttl: 30, nodes: [], nodesAt: 0, requests: [], selected: null, shown: "", plan: null,
                assignments: null, authNeeded: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "data") Object.assign(e.dataset, v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
// The state is also the badge's class: "in force" → "in-force".
const badge = (word) => el("span", { class: "badge " + String(word).replace(/[^A-Za-z0-9-]+/g, "-") }, word);
function ago(s) {
  if (s < 1) return "just now"; if (s < 90) return s.toFixed(0) + " s ago";
  if (s < 5400) return (s / 60).toFixed(0) + " min ago"; return (s / 3600).toFixed(1) + " h ago";
}
function bytes(n) {
  // Decimal units, as nodes give memory_gb (1 GB = 1e9 bytes) and as the plan picture prints them.
  for (const [u, k] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (n >= k) return (n / k).toFixed(u === "GB" ? 2 : 1) + " " + u;
  }
  return Math.round(n) + " bytes";
}

async function api(path, opts) {
  const headers = Object.assign({}, (opts || {}).headers);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  return fetch(path, Object.assign({}, opts, { headers, cache: "no-store" }));
}

function askToken(message) {
  state.authNeeded = true;
  $("auth").hidden = false; $("auth-msg").textContent = message || "";
}
$("auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t); $("token").value = "";
  state.authNeeded = false; $("auth").hidden = true; poll();
});

async function loadHealth() {
  const r = await api("/healthz");
  const h = await r.json();
  state.ttl = h.node_ttl_s;
  $("health").textContent = `${h.database} · auth ${h.auth} · node TTL ${h.node_ttl_s} s`;
  if (h.auth === "token" && !sessionStorage.getItem(TOKEN_KEY) && !state.authNeeded) askToken();
}

async function loadNodes() {
  const r = await api("/api/nodes");
  if (!r.ok) throw new Error("/api/nodes answered " + r.status);
  const body = await r.json();
  state.nodes = body.nodes; state.ttl = body.ttl_s; state.nodesAt = performance.now();
}

async function loadRequests() {
  if (state.authNeeded) {
    $("requests-msg").textContent = "Listing requests needs the admin token: enter it above.";
    return;
  }
  const r = await api("/api/requests");
  if (r.status === 401 || r.status === 403) {
    const d = await r.json().catch(() => ({}));
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(r.status === 403 ? "That token is not the admin token." : "");
    $("requests-msg").textContent = "Listing requests needs the admin token. " + (d.detail || "");
    return;
  }
  if (!r.ok) throw new Error("/api/requests answered " + r.status);
  state.requests = (await r.json()).requests; $("requests-msg").textContent = "";
  if (!state.selected || !state.requests.some((q) => q.request_id === state.selected)) {
    const fromHash = location.hash.startsWith("#request=") ? location.hash.slice(9) : null;
    const pick = state.requests.find((q) => q.request_id === fromHash) ||
                 state.requests.find((q) => q.plan_version) || state.requests[0];
    state.selected = pick ? pick.request_id : null;
  }
}

async function loadSelected() {
  const id = state.selected;
  if (!id) return;
  const q = state.requests.find((x) => x.request_id === id);
  $("request-reason").textContent = q && q.status === "failed" ? "failed: " + (q.reason || "") : "";
  const key = q && q.plan_version ? `${id}@${q.plan_version}` : "";
  if (key && key !== state.shown) {
    const [svgR, planR] = await Promise.all([
      api(`/api/plans/${encodeURIComponent(id)}.svg?version=${q.plan_version}`),
      api("/api/get-plan", { method: "POST", headers: { "Content-Type": "application/json" },
                             body: JSON.stringify({ request_id: id, version: q.plan_version }) })]);
    if (svgR.ok && planR.ok) {
      const doc = new DOMParser().parseFromString(await svgR.text(), "image/svg+xml");
      const root = doc.documentElement;
      if (root.nodeName === "svg") {
        $("plan").replaceChildren(document.importNode(root, true));
        state.plan = await planR.json(); state.shown = key;
        $("plan-title").textContent = `${q.model_name} · request ${id.slice(0, 8)} · version ${q.plan_version}`;
      }
    }
  } else if (!key) {
    state.plan = null; state.shown = "";
    $("plan").replaceChildren(el("p", { class: "muted" }, q ? `No plan yet (status ${q.status}).` : ""));
    $("plan-title").textContent = q ? `${q.model_name} · request ${id.slice(0, 8)}` : "";
  }
  await loadOptional(id);
}

// Endpoints that arrive with later issues; when one is missing (404/405) its part of the page stays hidden.
async function loadOptional(id) {
  const [a, p] = await Promise.all([api(`/api/requests/${encodeURIComponent(id)}/assignments`),
                                    api(`/api/requests/${encodeURIComponent(id)}/plans`)]);
  state.assignments = null;
  if (a.ok) {
    const body = await a.json();
    const list = Array.isArray(body) ? body : (body.assignments || []);
    // Before a request is distributed its list is empty: no column of blanks then.
    if (list.length) state.assignments = Object.fromEntries(list.map((x) => [x.node_id, x]));
  }
  renderMigration(p.ok ? await p.json() : null);
}

function stageOf(nodeId) {
  const a = state.plan && state.plan[nodeId];
  if (!a) return "";
  return a.blocks ? `stage ${a.stage} · [${a.blocks[0]}, ${a.blocks[1]})` : `${a.layer_names.length} tensors`;
}

function render() { renderNodes(); renderRequests(); }

function renderNodes() {
  const elapsed = (performance.now() - state.nodesAt) / 1000;
  const showAssign = state.assignments !== null;
  document.querySelectorAll(".assign-col").forEach((c) => { c.hidden = !showAssign; });
  let online = 0;
  const rows = state.nodes.map((n) => {
    const age = n.heartbeat_age_s + elapsed;
    const isOnline = n.online && age <= state.ttl;
    online += isOnline ? 1 : 0;
    const asg = showAssign && state.assignments[n.node_id];
    const assignCell = el("td", { class: "assign-col" },
                          asg ? badge(asg.state) : "", asg ? ` v${asg.plan_version}` : "");
    assignCell.hidden = !showAssign;
    return el("tr", { class: "node", data: { node: n.node_id, online: String(isOnline) } },
      el("td", {}, n.node_id), el("td", { class: "num" }, n.compute_tflops),
      el("td", { class: "num" }, bytes(n.memory_gb * 1e9)),
      el("td", { title: new Date(n.last_heartbeat * 1000).toLocaleString() }, ago(age)),
      el("td", { class: "status" }, badge(isOnline ? "online" : "offline")), assignCell,
      el("td", { class: "muted" }, stageOf(n.node_id)));
  });
  $("nodes").tBodies[0].replaceChildren(...rows);
  $("nodes-count").textContent = `${online} of ${state.nodes.length} online`;
  // A plan whose node is offline cannot run until the node returns or the worker re-plans: say so over its bars.
  const stages = state.plan ? Object.keys(state.plan).filter((k) => !k.startsWith("@")) : [];
  const down = stages.filter((id) => !rows.some((r) => r.dataset.node === id && r.dataset.online === "true"));
  const one = down.length === 1;
  $("plan-broken").textContent = down.length
    ? `This plan cannot run: ${one ? "node" : "nodes"} ${down.join(", ")} ${one ? "is" : "are"} offline.` : "";
}

// Rebuilt only after a poll, not on the 500 ms tick, so that a click never lands on a row being replaced.
function renderRequests() {
  $("requests").tBodies[0].replaceChildren(...state.requests.map((q) => {
    const tr = el("tr", { class: "request" + (q.request_id === state.selected ? " selected" : ""),
                          data: { request: q.request_id, status: q.status }, title: q.reason || "" },
      el("td", {}, q.request_id.slice(0, 8)), el("td", {}, q.model_name),
      el("td", { class: "status" }, badge(q.status)), el("td", {}, q.plan_version ? "v" + q.plan_version : "–"),
      el("td", {}, new Date(q.updated_at * 1000).toLocaleTimeString()));
    tr.addEventListener("click", () => { state.selected = q.request_id; location.hash = "request=" + q.request_id;
                                         render(); loadSelected().then(render).catch(showError); });
    return tr;
  }));
  $("requests-count").textContent = state.requests.length ? `${state.requests.length}` : "";
}

function showError(e) { $("updated").textContent = "error: " + e.message; }

let timer = null;
async function poll() {
  clearTimeout(timer);
  try {
    await loadHealth();
    await Promise.all([loadNodes(), loadRequests()]);
    await loadSelected();
    render();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) { showError(e); }
  timer = setTimeout(poll, POLL_MS);
}
setInterval(() => { if (state.nodesAt) renderNodes(); }, 500);
poll();
