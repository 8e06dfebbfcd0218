// sistemo dashboard: the core. API calls (session cookie + CSRF header), the live event stream
// (GET /v1/events, no polling), the element helper, the layout and the router. Pages are in
// pages.js and register themselves in PAGES.
"use strict";

const S = {
  me: null,          // {actor, role, csrf, expires_at}
  machines: new Map(), // name -> MachineInfo, kept current by events
  events: null,      // EventSource
  page: null,        // the current page's live hooks {onMachine, onChange, onProgress, onFirewall}
};
const PAGES = {};

// ---- elements ----------------------------------------------------------------------------

// h("button", {class: "x", onclick: f}, "text", child…): never parses markup, so names and
// messages from the daemon are always text.
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function isAdmin() { return S.me && S.me.role === "admin"; }

function bytes(n) {
  if (!n && n !== 0) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function badge(state) { return h("span", {class: "badge s-" + state, "data-state": state}, state); }

// A form field: label, input, hint, and the place its error is shown (next to it).
function field(label, input, hint) {
  const id = "f-" + Math.random().toString(36).slice(2, 9);
  input.id = id;
  const err = h("p", {class: "field-error", id: id + "-err", role: "alert"});
  input.setAttribute("aria-describedby", id + "-err");
  const f = h("div", {class: "field"}, h("label", {for: id}, label), input,
    hint ? h("p", {class: "hint"}, hint) : null, err);
  f.setError = (m) => { err.textContent = m || ""; input.setAttribute("aria-invalid", m ? "true" : "false"); };
  f.input = input;
  return f;
}

function toast(msg, bad) {
  const t = h("div", {class: "toast" + (bad ? " bad" : ""), role: "status"}, msg);
  document.body.append(t);
  setTimeout(() => t.remove(), 5000);
}

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(body, status) { super(body.error || ("HTTP " + status)); this.body = body; this.status = status; }
}

async function request(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && S.me && S.me.csrf) headers["X-CSRF-Token"] = S.me.csrf;
  const r = await fetch(path, {method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body)});
  if (r.status === 401 && path !== "/v1/login") { loggedOut(); }
  return r;
}

async function errorOf(r) {
  let b;
  try { b = await r.json(); } catch (_) { b = {error: "HTTP " + r.status, status: r.status}; }
  return new ApiError(b, r.status);
}

async function api(method, path, body) {
  const r = await request(method, path, body);
  if (!r.ok) throw await errorOf(r);
  const t = r.headers.get("content-type") || "";
  return t.includes("json") ? r.json() : r.text();
}

// A long operation answered as NDJSON: progress lines to onProgress, then the result.
async function stream(method, path, body, onProgress) {
  const r = await request(method, path, body);
  if (!r.ok) throw await errorOf(r);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "", result;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      const ev = JSON.parse(line);
      if ("progress" in ev) onProgress(ev.progress);
      else if ("result" in ev) result = ev.result;
      else if ("error" in ev) throw new ApiError(ev.error, ev.error.status);
    }
  }
  if (result === undefined) throw new ApiError({error: "the daemon closed the stream without a result"}, 500);
  return result;
}

// ---- live events -----------------------------------------------------------------------------

function connectEvents() {
  if (S.events) S.events.close();
  const es = new EventSource("/v1/events");
  S.events = es;
  const on = (name, f) => es.addEventListener(name, (e) => f(JSON.parse(e.data)));
  on("machine", (d) => { S.machines.set(d.machine.name, d.machine); hook("onMachine", d.machine); });
  on("machine_removed", (d) => { S.machines.delete(d.name); hook("onMachine", {name: d.name, removed: true}); });
  on("progress", (d) => hook("onProgress", d));
  on("change", (d) => hook("onChange", d.entry));
  on("firewall", (d) => { toast("Firewall: " + d.detail); hook("onFirewall", d); });
  on("resync", () => { loadMachines().then(() => route()); });
  es.addEventListener("open", () => document.body.dataset.live = "on");
  es.addEventListener("error", () => document.body.dataset.live = "off");
}

function hook(name, arg) { if (S.page && S.page[name]) S.page[name](arg); }

async function loadMachines() {
  const ms = await api("GET", "/v1/machines");
  S.machines = new Map(ms.map((m) => [m.name, m]));
}

// ---- session -------------------------------------------------------------------------------

function loggedOut() {
  S.me = null;
  if (S.events) { S.events.close(); S.events = null; }
  if (location.hash !== "#/login") location.hash = "#/login";
  else route();
}

async function logout() {
  try { await api("POST", "/v1/logout"); } catch (_) { /* the session may be gone already */ }
  loggedOut();
}

async function start() {
  try {
    const r = await fetch("/v1/session", {credentials: "same-origin"});
    if (r.ok) {
      S.me = await r.json();
      await loadMachines();
      connectEvents();
    }
  } catch (_) { /* shown as the log-in page */ }
  window.addEventListener("hashchange", route);
  route();
}

// ---- layout and router -----------------------------------------------------------------------

const NAV = [
  ["#/", "Overview"], ["#/machines", "Machines"], ["#/deploy", "Deploy", true], ["#/networks", "Networks"],
  ["#/images", "Images"], ["#/volumes", "Volumes"], ["#/history", "History"], ["#/system", "System"],
];

function layout(title, content) {
  const here = "#/" + (location.hash.slice(2).split(/[/?]/)[0] || "").replace(/^(machine|terminal)$/, "machines");
  const nav = h("nav", {class: "nav", "aria-label": "Main"},
    h("a", {class: "brand", href: "#/"}, "sistemo"),
    h("ul", {}, NAV.filter(([, , admin]) => !admin || isAdmin()).map(([href, label]) =>
      h("li", {}, h("a", {href, "aria-current": href === here ? "page" : null}, label)))),
    h("div", {class: "me"},
      h("span", {class: "who", title: "Signed in"}, S.me.actor.replace(/^user /, ""), " · ", S.me.role),
      h("span", {class: "live", title: "Live updates"}),
      h("button", {class: "link", onclick: logout, "data-testid": "logout"}, "Log out")));
  return h("div", {class: "shell"}, nav, h("main", {id: "main"}, h("h1", {}, title), content));
}

let routeSeq = 0;

// The current page goes: it closes what it keeps open (a followed console).
function leave() {
  if (S.page && S.page.leave) S.page.leave();
  S.page = null;
}

async function route() {
  const root = document.getElementById("app");
  const parts = location.hash.replace(/^#\/?/, "").split("?")[0].split("/").map(decodeURIComponent);
  if (!S.me) {
    leave();
    root.replaceChildren(PAGES.login());
    return;
  }
  if (parts[0] === "login") { location.hash = "#/"; return; }
  const name = parts[0] || "overview";
  const page = PAGES[name] || PAGES.notfound;
  leave();
  // A newer route (the hash changed while this page loaded) wins over this one.
  const seq = ++routeSeq;
  try {
    const p = await page(parts.slice(1));
    if (seq !== routeSeq) { if (p.leave) p.leave(); return; }
    S.page = p;
    root.replaceChildren(layout(p.title, p.el));
    const first = root.querySelector("main [autofocus]");
    if (first) first.focus();
  } catch (e) {
    if (!S.me || seq !== routeSeq) return;
    root.replaceChildren(layout("Error", h("p", {class: "error"}, e.message)));
  }
}

// ---- the browser terminal -----------------------------------------------------------------
// Admins only (it is a root shell). Its page (#/terminal/NAME) loads terminal.js and xterm.js
// on demand, so the dashboard's first load stays small; terminal.js does the rest.

function terminalSeam(name) {
  if (!isAdmin()) return h("p", {class: "hint", "data-testid": "no-terminal"}, "The terminal is for admins.");
  return h("p", {}, h("a", {class: "button", href: "#/terminal/" + encodeURIComponent(name),
    "data-testid": "terminal-open"}, "Open terminal"),
    " ", h("span", {class: "hint"}, "a login shell in the machine, in this browser"));
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    if (document.querySelector(`script[src="${src}"]`)) { resolve(); return; }
    const s = h("script", {src});
    s.addEventListener("load", resolve);
    s.addEventListener("error", () => { s.remove(); reject(new Error("could not load " + src)); });
    document.head.append(s);
  });
}

PAGES.terminal = async ([name]) => {
  if (!isAdmin()) return {title: "Terminal", el: h("p", {"data-testid": "no-terminal"}, "The terminal is for admins.")};
  await loadScript("/assets/terminal.js");
  return window.sistemoTerminal(name);
};

document.addEventListener("DOMContentLoaded", start);
