// The dashboard's re-planning part (issue 9). It only defines functions; dashboard.js calls renderMigration.
//
// From ``GET /api/requests/{id}/plans`` of the selected request, polled with the rest of the page:
// * a migration under way (``pulling``) gets a panel of its own above the plan: version from → to, why, the bytes to
//   pull from peers and from the model, "N of M pulls done" with a bar, nodes that will hold more than their memory
//   while they keep both versions (make-before-break), and one row per step (pull, switch, drop) with its state;
// * once it switched (or a later re-plan superseded it), one quiet line under the plan says so, with its steps
//   folded in a ``<details>``, next to the list of plan versions and their states.
//
// Like the rest of the page, every server string reaches the DOM through ``textContent`` (the page's ``el``).
"use strict";

function renderMigration(body) {
  const m = body && body.migration;
  const pulling = !!m && m.state === "pulling";
  $("migration").hidden = !pulling;
  if (pulling) renderPulling(m);
  const last = m && !pulling ? m : null;
  $("last-migration").hidden = !last;
  if (last) {
    $("last-summary").textContent = lastMigrationLine(last, body.plan_version);
    $("last-steps").tBodies[0].replaceChildren(...last.steps.map(stepRow));
  }
  const versions = (body && body.plans) || [];
  $("history").hidden = versions.length < 2;
  $("versions").tBodies[0].replaceChildren(...versions.map((v) => el("tr", { data: { version: v.version } },
    el("td", {}, "v" + v.version), el("td", { class: "status" }, badge(v.state)),
    el("td", {}, (v.stages || []).join(" → ")), el("td", { class: "num" }, seconds(v.bottleneck_s)),
    el("td", {}, clock(v.created_at)))));
}

function renderPulling(m) {
  const pulls = m.steps.filter((s) => s.action === "pull");
  const count = (state) => pulls.filter((s) => s.state === state).length;
  const doneBytes = pulls.reduce((sum, s) => sum + (s.state === "done" ? s.bytes || 0 : 0), 0);
  $("migration-title").textContent = `version ${m.from_version} → version ${m.to_version}`;
  $("migration-reason").textContent = `Started ${clock(m.created_at)} because ${m.reason}. Version ` +
    `${m.from_version} stays in force until every node of version ${m.to_version} is ready.`;
  $("migration-bytes").textContent = `${bytes(m.pull_bytes)} to pull: ${bytes(m.peer_bytes)} from peers, ` +
    `${bytes(m.model_bytes)} from the model.`;
  $("migration-bar").value = m.pull_bytes ? doneBytes / m.pull_bytes : 0;
  const more = [["pulling", "pulling"], ["failed", "failed"]].filter(([s]) => count(s))
    .map(([s, word]) => `, ${count(s)} ${word}`).join("");
  $("migration-progress").textContent = `${count("done")} of ${pulls.length} pulls done${more} · ` +
    `${bytes(doneBytes)} of ${bytes(m.pull_bytes)}`;
  // Make-before-break: a node keeps its old blocks until the switch, so it may hold more than its memory.
  $("migration-memory").textContent = (m.nodes || []).filter((n) => n.over_memory).map((n) =>
    `${n.node_id} holds ${bytes(n.peak_bytes)} at its peak (old and new blocks until the switch), over its ` +
    `${bytes(n.memory_bytes)} of memory.`).join(" ");
  $("migration-steps").tBodies[0].replaceChildren(...m.steps.map(stepRow));
}

function stepRow(s) {
  const source = s.source === "@model" ? "the model" : s.source ? "peer " + s.source : "";
  const tensors = s.tensor_count ? ` (${s.tensor_count} tensors)` : "";
  return el("tr", { class: "step", data: { step: s.id, action: s.action, node: s.node_id || "",
                                           source: s.source || "", state: s.state } },
    el("td", { class: "num" }, s.id), el("td", {}, s.node_id || "–"), el("td", {}, s.action),
    el("td", {}, blockRuns(s.blocks), el("span", { class: "muted" }, tensors)), el("td", { class: "source" }, source),
    el("td", { class: "num", title: s.oversize ? "one tensor larger than the step limit" : "" },
       s.bytes === undefined ? "" : bytes(s.bytes) + (s.oversize ? " (oversize)" : "")),
    el("td", { class: "muted" }, (s.after || []).join(", ")), el("td", { class: "status" }, badge(s.state)));
}

function lastMigrationLine(m, inForce) {
  const moved = `moved ${bytes(m.model_bytes)} from the model, ${bytes(m.peer_bytes)} from peers`;
  if (m.state === "superseded") {
    return `Re-plan to version ${m.to_version} (${m.reason}) abandoned ${clock(m.updated_at)}: a later re-plan ` +
           "took over.";
  }
  const head = inForce === m.to_version ? `Version ${m.to_version} in force since ${clock(m.updated_at)}`
                                        : `Version ${m.to_version} switched in ${clock(m.updated_at)}`;
  return `${head}, re-planned from version ${m.from_version} because ${m.reason}: ${moved}.`;
}

// Block indices as half-open runs, as the plan picture prints a stage: [0, 1, 2, 5] → "[0, 3) [5, 6)".
function blockRuns(blocks) {
  const runs = [];
  for (const b of blocks || []) {
    const last = runs[runs.length - 1];
    if (last && b === last[1]) last[1] = b + 1; else runs.push([b, b + 1]);
  }
  return runs.map(([s, e]) => `[${s}, ${e})`).join(" ");
}
function seconds(s) {
  if (typeof s !== "number") return "";
  return s < 1e-3 ? (s * 1e6).toFixed(1) + " µs" : s < 1 ? (s * 1e3).toFixed(1) + " ms" : s.toFixed(2) + " s";
}
function clock(t) {
  const d = new Date(t * 1000);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}
