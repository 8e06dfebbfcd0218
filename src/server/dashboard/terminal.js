// sistemo dashboard: the browser terminal page (#/terminal/NAME), loaded on demand by app.js.
// xterm.js and its fit addon are built into the binary from the npm registry (build.rs) and
// loaded here. A WebSocket to /v1/machines/{name}/terminal carries the shell's bytes (binary
// messages) and resizes (text: {"resize":{"rows","cols"}}); the daemon's last text message
// says how the shell ended. Leaving the page closes the socket, which ends the shell;
// Reconnect opens a new one. A connection lost without that message (a daemon restart, a
// network drop) is reopened by itself, up to RETRIES times with a growing pause, then waits
// for the button.
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

const RETRIES = 3;

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
  // Automatic reconnects since the last open socket, the pending one, and whether the page
  // was left (its sockets' close events come after that).
  let retries = 0, retry = null, left = false;

  const state = (s, text) => { el.dataset.state = s; status.textContent = text; again.hidden = s !== "closed"; };
  const send = (data) => { if (ws && ws.readyState === WebSocket.OPEN) ws.send(data); };

  // `lost`: a dropped connection is reopened; the old screen stays, and says so.
  function connect(lost) {
    if (left) return;
    clearTimeout(retry);
    retry = null;
    if (ws) ws.close();
    if (!lost) { term.reset(); retries = 0; }
    state("connecting", lost ? `Connection lost: reconnecting (${retries}/${RETRIES})…` : "Connecting…");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/v1/machines/" + encodeURIComponent(name) + "/terminal?rows=" + term.rows + "&cols=" + term.cols;
    const sock = new WebSocket(url);
    ws = sock;
    sock.binaryType = "arraybuffer";
    let opened = false, ended = false;
    sock.addEventListener("open", () => {
      opened = true;
      if (retries > 0) term.write("\x1b[2m[reconnected: a new shell]\x1b[0m\r\n");
      retries = 0;
      state("open", "Connected: a login shell in " + name);
      term.focus();
    });
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
      if (ws !== sock || ended || left) return;
      const cur = S.machines.get(name);
      if (cur && cur.status !== "running") {
        state("closed", name + " is " + cur.status + ": start it to open a terminal.");
      } else if ((opened || retries > 0) && retries < RETRIES) {
        // A session that was open, or a reconnect that failed: tried again, 1 s, 2 s, 4 s later.
        if (opened) term.write("\r\n\x1b[2m[connection lost]\x1b[0m\r\n");
        retries += 1;
        state("connecting", `Connection lost: reconnecting (${retries}/${RETRIES})…`);
        retry = setTimeout(() => connect(true), 500 * 2 ** retries);
      } else if (retries > 0) {
        state("closed", `Disconnected: ${RETRIES} reconnects failed.`);
      } else {
        state("closed", "Could not open a terminal (is the machine's agent up? see its status).");
      }
    });
  }

  term.onData((d) => send(enc.encode(d)));
  term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
  term.onResize(({rows, cols}) => send(JSON.stringify({resize: {rows, cols}})));
  again.addEventListener("click", () => connect(false));
  const refit = () => { if (el.isConnected) fit.fit(); };
  // Leaving the page ends the shell: as soon as the address names another page, whenever the
  // router gets to replacing this one (it may first wait for that page's data).
  const leave = () => {
    if (location.hash === route) return;
    left = true;
    clearTimeout(retry);
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
    else connect(false);
  }, 0);
  return {title: name + " — terminal", el,
    onMachine: (mm) => { if (mm.name === name && mm.status === "running" && el.dataset.state === "closed" && !ws) connect(false); }};
};
