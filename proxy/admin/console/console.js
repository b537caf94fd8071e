// mongobranch console: plain JavaScript over the admin HTTP API, no build step.
// Every request goes through api(), which adds the bearer token when one is set.
// Document contents are only ever inserted as text, never as HTML.
"use strict";

const TOKEN_KEY = "mongobranch.token";
const BASE = new URL("..", window.location.href); // the admin API root (console is /console/)
const MAX_DIFF_SHOWN = 200;
const state = { branches: [], selected: null, tab: "log", dropArmed: false };

function token() {
  return window.localStorage.getItem(TOKEN_KEY) || "";
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const bearer = token();
  if (bearer) headers.Authorization = "Bearer " + bearer;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(new URL(path, BASE), init);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const error = new Error((data && data.error) || `HTTP ${response.status}`);
    error.status = response.status;
    error.body = data;
    throw error;
  }
  return data;
}

function branchPath(name, suffix = "") {
  // "." and ".." are valid branch names but dot segments of a URL path.
  return "branches/" + encodeURIComponent(name).replace(/\./g, "%2E") + suffix;
}

// -- small DOM helpers ---------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function status(message, isError = false) {
  const node = $("status");
  node.textContent = message;
  node.classList.toggle("error", isError);
}

function fail(error) {
  status(error.message, true);
}

function pretty(value) {
  return value === null || value === undefined ? "(none)" : JSON.stringify(value, null, 2);
}

function idText(value) {
  return typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
}

function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

function span(seconds) {
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

// Masking, protection, expiry and idle expiry, e.g. "protected · expires in 2h · idle 30m".
function lifecycle(branch) {
  const parts = [];
  if (branch.masked) parts.push("masked");
  if (branch.protected) parts.push("protected");
  if (branch.expires_at) {
    parts.push(`expires in ${span(Math.max(0, (Date.parse(branch.expires_at) - Date.now()) / 1000))}`);
  }
  if (branch.idle_ttl) parts.push(`idle ${span(branch.idle_ttl)}`);
  return parts.join(" · ") || "—";
}

// -- the branch tree -----------------------------------------------------------------
function treeOrder(branches) {
  const names = new Set(branches.map((b) => b.name));
  const children = new Map();
  for (const b of branches) {
    const parent = names.has(b.parent) ? b.parent : "main";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(b);
  }
  const out = [];
  const walk = (parent, depth) => {
    const kids = (children.get(parent) || []).sort((a, b) => a.name.localeCompare(b.name));
    for (const b of kids) {
      out.push({ branch: b, depth });
      walk(b.name, depth + 1);
    }
  };
  walk("main", 1);
  return out;
}

async function loadTree() {
  status("loading branches…");
  const branches = await api("GET", "branches");
  state.branches = branches;
  const body = $("tree").tBodies[0];
  body.replaceChildren(el("tr", { class: "root", "data-branch": "main" },
    el("td", { text: "main" }), el("td", { class: "muted", text: "(base)" }),
    el("td"), el("td"), el("td"), el("td"), el("td")));
  const sizes = [];
  for (const { branch, depth } of treeOrder(branches)) {
    const size = el("td", { class: "size muted", text: "…" });
    const row = el("tr", { "data-branch": branch.name },
      el("td", {}, el("span", { class: "indent", text: "  ".repeat(depth - 1) + "└ " }),
        branch.name),
      el("td", { text: branch.parent }),
      el("td", { class: "port", text: branch.port }),
      el("td", { class: "mode", text: branch.mode || "wal" }),
      el("td", { class: "age", text: age(branch.created_at), title: branch.created_at }),
      size,
      el("td", { class: "lifecycle", text: lifecycle(branch), title: branch.expires_at || "" }));
    if (branch.name === state.selected) row.classList.add("selected");
    row.addEventListener("click", () => select(branch.name));
    body.append(row);
    sizes.push(loadSize(branch.name, size));
  }
  const from = $("create-from");
  const chosen = from.value;
  from.replaceChildren(el("option", { value: "main", text: "main" }),
    ...branches.map((b) => el("option", { value: b.name, text: b.name })).sort(
      (a, b) => a.value.localeCompare(b.value)));
  if ([...from.options].some((o) => o.value === chosen)) from.value = chosen;
  await Promise.all(sizes);
  status(`${branches.length} branch${branches.length === 1 ? "" : "es"}`);
}

async function loadSize(name, cell) {
  try {
    const info = await api("GET", branchPath(name));
    const namespaces = Object.values(info.namespaces || {});
    const changed = namespaces.reduce((sum, ns) => sum + (ns.changed || 0), 0);
    const live = namespaces.reduce((sum, ns) => sum + (ns.live || 0), 0);
    // A child's overlay may hold documents kept only to show its parent as at the
    // fork: those are not changes of its own.
    cell.textContent = changed
      ? `${changed} changed · ${live} live · ${namespaces.length} coll.`
      : "no changes";
  } catch (error) {
    cell.textContent = "?";
    cell.title = error.message;
  }
}

// -- one branch ----------------------------------------------------------------------
async function select(name) {
  state.selected = name;
  state.dropArmed = false;
  for (const row of $("tree").tBodies[0].rows) {
    row.classList.toggle("selected", row.dataset.branch === name);
  }
  const branch = state.branches.find((b) => b.name === name);
  $("detail-panel").hidden = name === "main" || !branch;
  if (!branch) return;
  $("detail-title").textContent = name;
  $("detail-uri").textContent = branch.uri;
  $("merge-into").textContent = branch.parent;
  for (const node of document.querySelectorAll(".branch-name")) node.textContent = name;
  $("merge-result").replaceChildren();
  $("drop-result").textContent = "";
  $("drop-confirm").hidden = true;
  await showTab(state.tab);
}

async function showTab(tab) {
  state.tab = tab;
  for (const button of $("tabs").querySelectorAll("button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${tab}`;
  try {
    if (tab === "log") await loadLog();
    if (tab === "diff") await loadDiff();
  } catch (error) {
    fail(error);
  }
}

async function loadLog() {
  const name = state.selected;
  status(`loading the log of ${name}…`);
  const result = await api("GET", branchPath(name, "/log?limit=100"));
  const body = $("log").tBodies[0];
  body.replaceChildren(...result.entries.map((e) => {
    const client = e.client || {};
    const who = ["app", "user", "conn"].filter((k) => client[k] !== undefined && client[k] !== "")
      .map((k) => `${k}=${client[k]}`).join(" ");
    const row = el("tr", {},
      el("td", { text: e.lsn }), el("td", { text: e.time }), el("td", { text: e.op }),
      el("td", { text: e.ns }), el("td", { text: idText(e._id) }), el("td", { text: who || "-" }));
    if (!e.visible) row.classList.add("muted");
    return row;
  }));
  if (!result.entries.length) body.append(el("tr", {}, el("td", { colspan: 6, text: "no writes yet" })));
  status(`log of ${name}: ${result.entries.length} entries`);
}

function sides(leftLabel, left, rightLabel, right) {
  return el("div", { class: "sides" },
    el("div", { class: "left" }, el("div", { class: "label", text: leftLabel }), el("pre", { text: pretty(left) })),
    el("div", { class: "right" }, el("div", { class: "label", text: rightLabel }), el("pre", { text: pretty(right) })));
}

function changeBox(change, parentName, branchName) {
  if (!("op" in change)) {
    const what = "collection" in change ? `collection ${change.collection}` : `index ${change.index} ${change.name || ""}`;
    return el("div", { class: "change ddl" }, el("div", { class: "what", text: `${change.ns}: ${what}` }));
  }
  return el("div", { class: `change ${change.op}`, "data-id": idText(change._id) },
    el("div", { class: "what", text: `${change.op} ${change.ns} _id ${idText(change._id)}` }),
    sides(parentName, change.parent, branchName, change.branch));
}

async function loadDiff() {
  const name = state.selected;
  status(`computing the diff of ${name}…`);
  const result = await api("GET", branchPath(name, "/diff"));
  const shown = result.changes.slice(0, MAX_DIFF_SHOWN);
  $("diff").replaceChildren(...shown.map((c) => changeBox(c, `${result.parent} (parent)`, `${name} (branch)`)));
  const counts = Object.entries(result.summary || {}).map(([ns, s]) =>
    `${ns}: +${s.insert} ~${s.update} −${s.delete}`).join("; ");
  $("diff-summary").textContent = result.changes.length
    ? `${result.changes.length} change(s) against ${result.parent}` +
      (result.changes.length > shown.length ? ` (first ${shown.length} shown)` : "") + `. ${counts}`
    : `no changes: ${name} matches ${result.parent}`;
  status(`diff of ${name}`);
}

async function merge(dryRun) {
  const name = state.selected;
  const strategy = $("merge-strategy").value;
  status(`${dryRun ? "dry run of the merge" : "merging"} ${name}…`);
  let result;
  let refused = false;
  try {
    result = await api("POST", branchPath(name, "/merge"),
      { strategy, dry_run: dryRun, force: $("merge-force").checked });
  } catch (error) {
    if (error.status !== 409 || !error.body || !error.body.conflicts) throw error;
    result = error.body;
    refused = true;
  }
  const pending = result.dry_run || refused;
  const applied = result.applied || {};
  const verb = pending ? "to apply" : "applied";
  const head = el("p", { class: refused ? "conflict" : "", id: "merge-outcome" },
    refused ? `Merge aborted: ${result.conflicts.length} conflict(s); nothing was changed.`
      : result.dry_run ? `Dry run into ${result.into}: nothing was changed.`
        : `Merged ${name} into ${result.into}.`);
  const counts = el("table", { id: "merge-counts" },
    el("tbody", {},
      ...["insert", "update", "delete"].map((op) => el("tr", {}, el("th", { text: `${op}s ${verb}` }), el("td", { text: applied[op] || 0 }))),
      el("tr", {}, el("th", { text: "conflicts" }), el("td", { text: result.conflicts.length })),
      el("tr", {}, el("th", { text: "skipped conflicts" }), el("td", { text: result.skipped_conflicts || 0 }))));
  const conflicts = result.conflicts.map((c) => el("div", { class: "change conflict-box update", "data-id": idText(c._id) },
    el("div", { class: "what conflict", text: `conflict: ${c.ns} _id ${idText(c._id)} (branch ${c.op}; the parent changed it since)` }),
    sides(`${result.into} now`, c.parent, `${name}`, c.branch)));
  $("merge-result").replaceChildren(head, counts, ...conflicts);
  if (!pending) await loadTree(); // sizes changed
  status(head.textContent, refused);
}

async function drop() {
  const name = state.selected;
  await api("DELETE", branchPath(name));
  $("drop-result").textContent = `dropped ${name}`;
  state.selected = null;
  $("detail-panel").hidden = true;
  await loadTree();
  status(`dropped ${name}`);
}

async function create(event) {
  event.preventDefault();
  const body = { name: $("create-name").value.trim(), from: $("create-from").value };
  if ($("create-mode").value) body.mode = $("create-mode").value;
  status(`creating ${body.name}…`);
  const branch = await api("POST", "branches", body);
  $("create-name").value = "";
  await loadTree();
  await select(branch.name);
  status(`created ${branch.name} on port ${branch.port}`);
}

function guard(fn) {
  return (...args) => fn(...args).catch(fail);
}

window.addEventListener("DOMContentLoaded", () => {
  $("token").value = token();
  $("token").addEventListener("change", () => {
    const value = $("token").value.trim();
    if (value) window.localStorage.setItem(TOKEN_KEY, value);
    else window.localStorage.removeItem(TOKEN_KEY);
    guard(loadTree)();
  });
  $("refresh").addEventListener("click", guard(loadTree));
  $("create-form").addEventListener("submit", guard(create));
  for (const button of $("tabs").querySelectorAll("button")) {
    button.addEventListener("click", guard(() => showTab(button.dataset.tab)));
  }
  $("merge-dry-run").addEventListener("click", guard(() => merge(true)));
  $("merge-apply").addEventListener("click", guard(() => merge(false)));
  $("drop").addEventListener("click", () => { $("drop-confirm").hidden = false; });
  $("drop-confirm").addEventListener("click", guard(drop));
  guard(loadTree)();
});
