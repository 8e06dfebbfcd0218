// sistemo dashboard: the browser terminal page (#/terminal/NAME), loaded on demand by app.js.
// xterm.js and its fit addon are built into the binary from the npm registry (build.rs) and
// loaded here. A WebSocket to /v1/machines/{name}/terminal carries the shell's bytes (binary
// messages) and resizes (text: {"resize":{"rows","cols"}}); the daemon's last text message
// says how the shell ended. Leaving the page closes the socket, which ends the shell;
// Reconnect opens a new one.
"use strict";

function loadStyle(href) {
  return new Promise((resolve, reject) => {
    if (document.querySelector(`link[href="${href}"]`)) { resolve(); return; }
    const l = h("link", {rel: "stylesheet", href});
    l.addEventListener("load", resolve);
    l.addEventListener("error", () => { l.remove(); reject(new Error("could not load " + href)); });
    document.head.append(l);
  });
}

async function loadXterm() {
  if (window.Terminal && window.FitAddon) return;
  try {
    await Promise.all([loadStyle("/assets/xterm.css"), loadScript("/assets/xterm.js")]);
  } catch (_) {
    throw new Error("This sistemo was built without the terminal's library (xterm.js): run scripts/deps, then build it again.");
  }
}

window.sistemoTerminal = async (name) => {
  const route = location.hash;
  await loadXterm();
  const m = S.machines.get(name);
  const status = h("span", {class: "term-status", role: "status"});
  const again = h("button", {hidden: true, "data-testid": "terminal-reconnect"}, "Reconnect");
  const screen = h("div", {class: "term-screen", "data-testid": "terminal-screen"});
  const el = h("div", {class: "terminal", "data-testid": "terminal", "data-state": "connecting"},
    h("div", {class: "toolbar term-bar"},
      h("a", {href: "#/machine/" + encodeURIComponent(name)}, "← " + name), status, again),
    screen);
  const term = new Terminal({
    cursorBlink: true, fontSize: 14, scrollback: 5000,
    fontFamily: 'ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace',
    theme: {background: "#10151b", foreground: "#d7dde5"},
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  const enc = new TextEncoder();
  let ws = null;

  const state = (s, text) => { el.dataset.state = s; status.textContent = text; again.hidden = s !== "closed"; };
  const send = (data) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(data); };

  function connect() {
    if (ws) ws.close();
    term.reset();
    state("connecting", "Connecting…");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/v1/machines/" + encodeURIComponent(name) + "/terminal?rows=" + term.rows + "&cols=" + term.cols;
    const sock = new WebSocket(url);
    ws = sock;
    sock.binaryType = "arraybuffer";
    let opened = false, ended = false;
    sock.addEventListener("open", () => { opened = true; state("open", "Connected: a login shell in " + name); term.focus(); });
    sock.addEventListener("message", (e) => {
      if (typeof e.data !== "string") { term.write(new Uint8Array(e.data)); return; }
      let c;
      try { c = JSON.parse(e.data); } catch (_) { return; }
      if (c.exited) {
        ended = true;
        const how = c.exited.signal ? "killed by signal " + c.exited.signal : "exit " + c.exited.code;
        state("closed", "The shell ended (" + how + ").");
      } else if (c.error) {
        ended = true;
        state("closed", "The session failed: " + c.error);
      }
    });
    sock.addEventListener("close", () => {
      if (ws !== sock || ended) return;
      const cur = S.machines.get(name);
      if (!opened && cur && cur.status !== "running") state("closed", name + " is " + cur.status + ": start it to open a terminal.");
      else if (!opened) state("closed", "Could not open a terminal (is the machine's agent up? see its status).");
      else state("closed", "Disconnected.");
    });
  }

  term.onData((d) => send(enc.encode(d)));
  term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
  term.onResize(({rows, cols}) => send(JSON.stringify({resize: {rows, cols}})));
  again.addEventListener("click", connect);
  const refit = () => { if (el.isConnected) fit.fit(); };
  // Leaving the page ends the shell: as soon as the address names another page, whenever the
  // router gets to replacing this one (it may first wait for that page's data).
  const leave = () => {
    if (location.hash === route) return;
    if (ws) ws.close();
    term.dispose();
    window.removeEventListener("resize", refit);
    window.removeEventListener("hashchange", leave);
  };
  window.addEventListener("resize", refit);
  window.addEventListener("hashchange", leave);
  // The page is in the document once the router has placed it.
  setTimeout(() => {
    term.open(screen);
    fit.fit();
    if (m && m.status !== "running") state("closed", name + " is " + m.status + ": start it to open a terminal.");
    else connect();
  }, 0);
  return {title: name + " — terminal", el,
    onMachine: (mm) => { if (mm.name === name && mm.status === "running" && el.dataset.state === "closed" && !ws) connect(); }};
};
