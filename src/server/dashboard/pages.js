// sistemo dashboard: the pages. Each returns {title, el} plus the live hooks it wants
// (onMachine, onChange, onProgress, onFirewall), called from the event stream. Mutating
// controls are only built for admins.
"use strict";

const STATES = ["running", "creating", "starting", "stopping", "stopped", "error"];

// Put an API error next to the field it concerns (by what the message names), else on the form.
function showError(e, fields, formErr) {
  const msg = e.message;
  const low = msg.toLowerCase();
  for (const [key, f] of Object.entries(fields)) {
    if (f.match && f.match.some((w) => low.includes(w))) { f.setError(msg); f.input.focus(); return; }
    if (!f.match && low.includes(key)) { f.setError(msg); f.input.focus(); return; }
  }
  formErr.textContent = msg;
}

function clearErrors(fields, formErr) {
  Object.values(fields).forEach((f) => f.setError(""));
  formErr.textContent = "";
}

PAGES.login = () => {
  const user = field("User name", h("input", {name: "username", autocomplete: "username", required: true, autofocus: true}));
  const pass = field("Password", h("input", {name: "password", type: "password", autocomplete: "current-password", required: true}));
  const err = h("p", {class: "form-error", role: "alert"});
  const form = h("form", {class: "card login", "aria-label": "Log in"},
    h("h1", {}, "sistemo"), user, pass, err, h("button", {type: "submit", class: "primary"}, "Log in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors({user, pass}, err);
    if (!user.input.value) { user.setError("Enter your user name."); user.input.focus(); return; }
    try {
      S.me = await api("POST", "/v1/login", {username: user.input.value, password: pass.input.value});
      await loadMachines();
      connectEvents();
      location.hash = "#/";
      route();
    } catch (e) {
      pass.setError(e.message);
      pass.input.select();
    }
  });
  setTimeout(() => user.input.focus(), 0);
  return h("div", {class: "center"}, form);
};

PAGES.overview = async () => {
  const sys = await api("GET", "/v1/system");
  const counts = h("div", {class: "cards"});
  const drawCounts = () => counts.replaceChildren(...STATES.map((s) => {
    const n = [...S.machines.values()].filter((m) => m.status === s).length;
    return h("a", {class: "card stat", href: "#/machines?state=" + s, "data-testid": "count-" + s},
      h("span", {class: "num"}, n), badge(s));
  }));
  drawCounts();
  const meter = (label, used, total, text) => h("div", {class: "card"},
    h("h2", {}, label), h("meter", {min: 0, max: total || 1, value: used, "aria-label": label}), h("p", {}, text));
  const fw = h("p", {"data-testid": "firewall", class: sys.firewall === "in sync" ? "ok" : "bad"}, sys.firewall);
  const el = h("div", {},
    h("h2", {}, "Machines by state"), counts,
    h("h2", {}, "Host"),
    h("div", {class: "cards"},
      h("div", {class: "card"}, h("h2", {}, "CPU"), h("p", {class: "num"}, sys.cpus),
        h("p", {}, "load " + sys.load1.toFixed(2) + " · " + sys.hypervisor)),
      meter("Memory", sys.mem_total - sys.mem_available, sys.mem_total,
        bytes(sys.mem_available) + " free of " + bytes(sys.mem_total)),
      meter("Disk", sys.disk_total - sys.disk_free, sys.disk_total,
        bytes(sys.disk_free) + " free of " + bytes(sys.disk_total)),
      h("div", {class: "card"}, h("h2", {}, "Firewall"), fw)));
  return {title: "Overview", el, onMachine: drawCounts,
    onFirewall: async () => { fw.textContent = (await api("GET", "/v1/system")).firewall; }};
};

// Start, stop, restart, delete: streamed; the row or page updates from events.
async function lifecycle(name, op, btn) {
  if (op === "delete" && !confirm("Delete machine " + name + "? Its disk and ports go with it.")) return;
  btn.disabled = true;
  try {
    if (op === "delete") await stream("DELETE", "/v1/machines/" + encodeURIComponent(name), undefined, () => {});
    else await stream("POST", "/v1/machines/" + encodeURIComponent(name) + "/" + op, undefined, () => {});
    toast(name + ": " + op + " done");
  } catch (e) { toast(name + ": " + e.message, true); }
  btn.disabled = false;
}

function actions(m) {
  if (!isAdmin()) return null;
  const b = (op, label, show) => show ? h("button", {class: op === "delete" ? "danger" : "",
    "data-action": op, onclick: (ev) => lifecycle(m.name, op, ev.target)}, label) : null;
  const run = m.status === "running";
  return h("div", {class: "actions"}, b("start", "Start", !run && m.status !== "creating"),
    b("stop", "Stop", run), b("restart", "Restart", run), b("delete", "Delete", true));
}

PAGES.machines = () => {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const filter = h("input", {type: "search", placeholder: "name, image, IP or state", value: q.get("state") || "",
    "aria-label": "Filter machines"});
  const body = h("tbody");
  const draw = () => {
    const f = filter.value.trim().toLowerCase();
    const ms = [...S.machines.values()].filter((m) => !f ||
      [m.name, m.image, m.ip, m.status].some((v) => (v || "").toLowerCase().includes(f)))
      .sort((a, b) => a.name.localeCompare(b.name));
    body.replaceChildren(...ms.map((m) => h("tr", {"data-machine": m.name},
      h("td", {}, h("a", {href: "#/machine/" + encodeURIComponent(m.name)}, m.name)),
      h("td", {}, badge(m.status)), h("td", {}, m.ip), h("td", {}, m.image),
      h("td", {}, m.ports.map((p) => p.spec).join(", ")), h("td", {}, actions(m)))));
    if (!ms.length) body.append(h("tr", {}, h("td", {colspan: 6, class: "empty"},
      S.machines.size ? "No machine matches." : "No machines yet.")));
  };
  filter.addEventListener("input", draw);
  draw();
  const el = h("div", {},
    h("div", {class: "toolbar"}, filter, isAdmin() ? h("a", {class: "button primary", href: "#/deploy"}, "Deploy") : null),
    h("div", {class: "scroll"}, h("table", {}, h("thead", {}, h("tr", {},
      ["Name", "State", "IP", "Image", "Ports", ""].map((c) => h("th", {}, c)))), body)));
  return {title: "Machines", el, onMachine: draw};
};

PAGES.machine = async ([name]) => {
  const m0 = await api("GET", "/v1/machines/" + encodeURIComponent(name));
  S.machines.set(m0.name, m0);
  const status = h("dl", {class: "facts"});
  const ports = h("tbody");
  const acts = h("div");
  const config = h("pre", {class: "config"});
  const draw = (m) => {
    const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
    status.replaceChildren(...row("Status", badge(m.status)), ...row("IP", m.ip), ...row("Network", m.network),
      ...row("Image", m.image), ...row("vCPUs", m.vcpus), ...row("Memory", m.memory_mib + " MiB"),
      ...row("Disk", bytes(m.storage_bytes)), ...row("Restart", m.restart), ...row("VMM", m.vmm || "-"),
      ...(m.error ? row("Error", m.error) : []), ...(m.paused ? row("Paused", m.paused) : []));
    ports.replaceChildren(...m.ports.map((p) => h("tr", {"data-port": p.spec},
      h("td", {}, p.display), h("td", {}, p.bind || "all addresses"),
      h("td", {}, isAdmin() ? h("button", {class: "danger", onclick: (ev) => unexpose(m.name, p, ev.target)},
        "Unexpose") : null))));
    if (!m.ports.length) ports.append(h("tr", {}, h("td", {colspan: 3, class: "empty"}, "No exposed ports.")));
    acts.replaceChildren(actions(m) || "");
    config.textContent = JSON.stringify(m, null, 2);
  };
  draw(m0);
  // The console, live: the daemon sends its tail, then each new piece as it comes.
  const logs = h("pre", {class: "logs", tabindex: 0, "aria-label": "Console log", "data-testid": "logs"});
  let stream = null;
  const follow = () => {
    if (stream) stream.close();
    logs.textContent = "";
    stream = new EventSource("/v1/machines/" + encodeURIComponent(name) + "/logs/stream");
    stream.addEventListener("log", (ev) => {
      const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 8;
      logs.textContent = (logs.textContent + JSON.parse(ev.data).text).slice(-200000);
      if (atEnd) logs.scrollTop = logs.scrollHeight;
    });
    // Ended (the machine was deleted, the daemon stopped): no silent reconnect that would
    // repeat the tail; Follow starts again.
    stream.onerror = () => { stream.close(); logs.setAttribute("data-state", "ended"); };
    logs.setAttribute("data-state", "live");
  };
  follow();
  let form = null;
  if (isAdmin()) {
    const spec = field("Port", h("input", {name: "spec", placeholder: "8080:80", required: true, autocomplete: "off"}),
      "[HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp] — e.g. 80, 8080:80, 53/udp, 127.0.0.1:8080:80, 8000-8010:9000-9010");
    const err = h("p", {class: "form-error", role: "alert"});
    form = h("form", {class: "inline", "aria-label": "Expose a port"}, spec, h("button", {type: "submit", class: "primary"}, "Expose"), err);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors({spec}, err);
      const specs = spec.input.value.split(/[\s,]+/).filter(Boolean);
      if (!specs.length) { spec.setError("Enter a port, e.g. 8080:80."); return; }
      try {
        draw(await api("POST", "/v1/machines/" + encodeURIComponent(name) + "/expose", {ports: specs}));
        spec.input.value = "";
        toast("Exposed " + specs.join(", "));
      } catch (e) { spec.setError(e.message); spec.input.focus(); }
    });
  }
  const el = h("div", {},
    h("p", {}, h("a", {href: "#/machines"}, "← Machines")),
    acts, h("section", {}, h("h2", {}, "Status"), status),
    h("section", {}, h("h2", {}, "Ports"), h("div", {class: "scroll"}, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Rule"), h("th", {}, "Bound to"), h("th", {}, ""))), ports)), form),
    h("section", {}, h("h2", {}, "Logs ", h("button", {class: "link", onclick: follow}, "Follow again")), logs),
    h("section", {}, h("h2", {}, "Terminal"), terminalSeam(name)),
    h("section", {}, h("h2", {}, "Configuration"), config));
  return {title: name, el,
    onMachine: (m) => {
      if (m.name !== name) return;
      if (m.removed) { toast(name + " was deleted"); location.hash = "#/machines"; return; }
      draw(m);
    },
    leave: () => { if (stream) stream.close(); }};
};

async function unexpose(name, p, btn) {
  btn.disabled = true;
  const host = (p.bind ? p.bind + ":" : "") + p.host_port + "/" + p.protocol;
  try { await api("POST", "/v1/machines/" + encodeURIComponent(name) + "/unexpose", {port: host}); toast("Unexposed " + host); }
  catch (e) { toast(e.message, true); btn.disabled = false; }
}

PAGES.deploy = async () => {
  if (!isAdmin()) return {title: "Deploy", el: h("p", {}, "Viewers cannot deploy.")};
  // The image list only helps typing: a backend without images still deploys.
  const [images, nets] = await Promise.all([api("GET", "/v1/images").catch(() => []), api("GET", "/v1/networks")]);
  const list = h("datalist", {id: "image-tags"}, images.flatMap((i) => i.tags).map((t) => h("option", {value: t})));
  const f = {
    image: field("Image", h("input", {name: "image", list: "image-tags", required: true, autofocus: true, placeholder: "debian"}),
      "A tag, a registry reference (pulled when missing), a file under image_dirs, or an https URL"),
    name: field("Name", h("input", {name: "name", placeholder: "after the image", pattern: "[a-z0-9-]+"}), "a-z, 0-9, '-'"),
    vcpus: field("vCPUs", h("input", {name: "vcpus", type: "number", min: 1, value: 1})),
    memory: field("Memory", h("input", {name: "memory", value: "512M"}), "e.g. 512M, 2G"),
    storage: field("Disk", h("input", {name: "storage", placeholder: "image size, at least 2G"})),
    network: field("Network", h("select", {name: "network"}, nets.map((n) => h("option", {value: n.name}, n.name + " (" + n.subnet + ")")))),
    expose: field("Exposed ports", h("textarea", {name: "expose", rows: 2, placeholder: "8080:80\n53/udp"}),
      "One spec per line: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]"),
    restart: field("Restart", h("select", {name: "restart"}, ["no", "on-failure", "always"].map((r) => h("option", {value: r}, r)))),
  };
  f.vcpus.match = ["vcpu"]; f.memory.match = ["memory"]; f.storage.match = ["storage", "disk"];
  f.expose.match = ["port", "expose", "spec"]; f.image.match = ["image", "url", "sha256"];
  f.name.match = ["name"]; f.network.match = ["network"]; f.restart.match = ["restart"];
  const err = h("p", {class: "form-error", role: "alert"});
  const progress = h("ol", {class: "progress", "aria-live": "polite", "data-testid": "progress"});
  const submit = h("button", {type: "submit", class: "primary"}, "Deploy");
  const form = h("form", {class: "card grid", "aria-label": "Deploy a machine"}, ...Object.values(f), err, submit);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors(f, err);
    const v = (k) => f[k].input.value.trim();
    if (!v("image")) { f.image.setError("Enter an image, e.g. debian."); f.image.input.focus(); return; }
    if (v("name") && !/^[a-z0-9-]+$/.test(v("name"))) { f.name.setError("Use a-z, 0-9 and '-' only."); f.name.input.focus(); return; }
    const req = {image: v("image"), name: v("name") || null, vcpus: parseInt(v("vcpus"), 10) || null,
      memory: v("memory") || null, storage: v("storage") || null, network: v("network") || null,
      expose: v("expose").split(/\s+/).filter(Boolean), restart: v("restart")};
    submit.disabled = true;
    progress.replaceChildren();
    try {
      const m = await stream("POST", "/v1/machines", req, (line) => progress.append(h("li", {}, line)));
      S.machines.set(m.name, m);
      location.hash = "#/machine/" + encodeURIComponent(m.name);
    } catch (e) { showError(e, f, err); }
    submit.disabled = false;
  });
  return {title: "Deploy a machine", el: h("div", {}, list, form, h("h2", {}, "Progress"), progress)};
};

PAGES.networks = async () => {
  const body = h("tbody");
  const draw = async () => {
    const ns = await api("GET", "/v1/networks");
    body.replaceChildren(...ns.map((n) => h("tr", {"data-network": n.name}, h("td", {}, n.name), h("td", {}, n.subnet),
      h("td", {}, n.gateway), h("td", {}, n.bridge), h("td", {}, n.machines),
      h("td", {}, isAdmin() && n.name !== "default" ? h("button", {class: "danger", onclick: async (ev) => {
        if (!confirm("Delete network " + n.name + "?")) return;
        ev.target.disabled = true;
        try { await api("DELETE", "/v1/networks/" + encodeURIComponent(n.name)); } catch (e) { toast(e.message, true); ev.target.disabled = false; }
      }}, "Delete") : null))));
  };
  await draw();
  let form = null;
  if (isAdmin()) {
    const f = {name: field("Name", h("input", {name: "name", required: true, maxlength: 11})),
      subnet: field("Subnet", h("input", {name: "subnet", placeholder: "a free 10.x.0.0/24"}))};
    const err = h("p", {class: "form-error", role: "alert"});
    form = h("form", {class: "card inline", "aria-label": "Create a network"}, f.name, f.subnet,
      h("button", {type: "submit", class: "primary"}, "Create"), err);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(f, err);
      try {
        await api("POST", "/v1/networks", {name: f.name.input.value.trim(), subnet: f.subnet.input.value.trim() || null});
        f.name.input.value = ""; f.subnet.input.value = "";
      } catch (e) { showError(e, f, err); }
    });
  }
  const el = h("div", {}, h("div", {class: "scroll"}, h("table", {}, h("thead", {}, h("tr", {},
    ["Name", "Subnet", "Gateway", "Bridge", "Machines", ""].map((c) => h("th", {}, c)))), body)), form);
  return {title: "Networks", el, onChange: (e) => { if (e.action.startsWith("network.") || e.action === "machine.deploy" || e.action === "machine.delete") draw(); }};
};

PAGES.images = async () => {
  const body = h("tbody");
  const draw = async () => {
    let is;
    try { is = await api("GET", "/v1/images"); } catch (e) {
      body.replaceChildren(h("tr", {}, h("td", {colspan: 6, class: "empty"}, e.message)));
      return;
    }
    body.replaceChildren(...is.map((i) => h("tr", {}, h("td", {}, i.tags.join(", ") || "-"),
      h("td", {class: "mono"}, i.sha256.slice(0, 12)), h("td", {}, bytes(i.size)), h("td", {}, i.source),
      h("td", {}, i.used_by.join(", ") || "-"),
      h("td", {}, isAdmin() && i.tags.length ? h("button", {class: "danger", onclick: async (ev) => {
        if (!confirm("Delete image " + i.tags[0] + "?")) return;
        try { await api("DELETE", "/v1/images/" + encodeURIComponent(i.tags[0])); } catch (e) { toast(e.message, true); }
        draw(); ev.target.disabled = true;
      }}, "Delete") : null))));
    if (!is.length) body.append(h("tr", {}, h("td", {colspan: 6, class: "empty"}, "No images yet.")));
  };
  await draw();
  let form = null, pull = null;
  const progress = h("ol", {class: "progress", "aria-live": "polite"});
  if (isAdmin()) {
    // A registry image (OCI or Docker), converted to a bootable disk; progress per layer.
    const p = {reference: field("Reference", h("input", {name: "reference", required: true,
      placeholder: "docker.io/library/nginx:1.27"}), "REGISTRY/REPOSITORY:TAG or @sha256:…"),
    name: field("Extra tag", h("input", {name: "tag", placeholder: "web"}), "optional: another name for it")};
    // A private registry's account, sent with this pull only (the daemon stores nothing).
    p.username = field("Registry user", h("input", {name: "username", autocomplete: "off"}), "for this pull only");
    p.password = field("Registry password", h("input", {name: "password", type: "password", autocomplete: "off"}));
    p.username.match = ["authentication"];
    p.password.match = [];
    p.reference.match = ["reference", "registry", "manifest", "repository"];
    p.name.match = ["tag"];
    const perr = h("p", {class: "form-error", role: "alert"});
    pull = h("form", {class: "card inline", "aria-label": "Pull an image"}, p.reference, p.name,
      h("details", {class: "login"}, h("summary", {}, "Private registry"), p.username, p.password),
      h("button", {type: "submit", class: "primary"}, "Pull"), perr);
    pull.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(p, perr);
      progress.replaceChildren();
      const button = pull.querySelector("button");
      button.disabled = true;
      const reference = p.reference.input.value.trim(), username = p.username.input.value.trim();
      const credentials = username ? {username, password: p.password.input.value} : null;
      try {
        const i = await stream("POST", "/v1/images/pull", {reference,
          name: p.name.input.value.trim() || null, credentials}, (l) => progress.append(h("li", {}, l)));
        toast("Pulled " + reference + " (" + i.sha256.slice(0, 12) + ")");
        p.password.input.value = "";
        draw();
      } catch (e) { showError(e, p, perr); }
      button.disabled = false;
    });
    const f = {name: field("Tag", h("input", {name: "name", placeholder: "debian"})),
      include: field("Extra packages", h("input", {name: "include", placeholder: "nginx,nodejs"}), "comma-separated")};
    f.include.match = ["package", "include"];
    const err = h("p", {class: "form-error", role: "alert"});
    form = h("form", {class: "card inline", "aria-label": "Build a Debian image"}, f.name, f.include,
      h("button", {type: "submit", class: "primary"}, "Build debian"), err);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(f, err);
      progress.replaceChildren();
      const include = f.include.input.value.split(",").map((s) => s.trim()).filter(Boolean);
      try {
        await stream("POST", "/v1/images/build", {base: "debian", name: f.name.input.value.trim() || null, include},
          (l) => progress.append(h("li", {}, l)));
        draw();
      } catch (e) { showError(e, f, err); }
    });
  }
  const el = h("div", {}, h("div", {class: "scroll"}, h("table", {}, h("thead", {}, h("tr", {},
    ["Tags", "sha256", "Size", "Source", "Used by", ""].map((c) => h("th", {}, c)))), body)), pull, form, progress);
  return {title: "Images", el, onChange: (e) => { if (e.action.startsWith("image.")) draw(); }};
};

PAGES.history = async () => {
  const PAGE = 50;
  let offset = 0;
  const action = h("input", {type: "search", placeholder: "action, e.g. machine", "aria-label": "Action"});
  const target = h("input", {type: "search", placeholder: "target", "aria-label": "Target"});
  const body = h("tbody");
  const where = h("span", {class: "hint"});
  const prev = h("button", {onclick: () => { offset = Math.max(0, offset - PAGE); draw(); }}, "← Newer");
  const next = h("button", {onclick: () => { offset += PAGE; draw(); }}, "Older →");
  const row = (e) => h("tr", {}, h("td", {class: "mono"}, e.at.replace("T", " ").slice(0, 19)),
    h("td", {}, (e.actor || (e.uid !== null && e.uid !== undefined ? "uid " + e.uid : "-")) + (e.remote ? " (" + e.remote + ")" : "")),
    h("td", {}, e.action), h("td", {}, e.target), h("td", {class: e.result === "ok" ? "ok" : "bad"}, e.result));
  const draw = async () => {
    const p = new URLSearchParams({limit: PAGE, offset});
    if (action.value.trim()) p.set("action", action.value.trim());
    if (target.value.trim()) p.set("target", target.value.trim());
    const es = await api("GET", "/v1/history?" + p);
    body.replaceChildren(...es.map(row));
    if (!es.length) body.append(h("tr", {}, h("td", {colspan: 5, class: "empty"}, "Nothing here.")));
    prev.disabled = offset === 0; next.disabled = es.length < PAGE;
    where.textContent = "entries " + (offset + 1) + "–" + (offset + es.length);
  };
  const form = h("form", {class: "toolbar", role: "search"}, action, target, h("button", {type: "submit"}, "Filter"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); offset = 0; draw(); });
  await draw();
  const el = h("div", {}, form, h("div", {class: "scroll"}, h("table", {}, h("thead", {}, h("tr", {},
    ["Time", "Who", "Action", "Target", "Result"].map((c) => h("th", {}, c)))), body)),
  h("div", {class: "pager"}, prev, where, next));
  return {title: "History", el, onChange: (e) => {
    const a = action.value.trim(), t = target.value.trim();
    if (offset === 0 && (!a || e.action === a || e.action.startsWith(a + ".")) && (!t || e.target === t)) {
      body.prepend(row(e));
      while (body.children.length > PAGE) body.lastChild.remove();
    }
  }};
};

PAGES.system = async () => {
  const [sys, info] = await Promise.all([api("GET", "/v1/system"), api("GET", "/v1/info")]);
  const row = (k, v) => [h("dt", {}, k), h("dd", {}, v)];
  const el = h("div", {},
    h("section", {}, h("h2", {}, "You"), h("dl", {class: "facts"}, ...row("Signed in as", S.me.actor), ...row("Role", S.me.role),
      ...(S.me.expires_at ? row("Session ends", new Date(S.me.expires_at * 1000).toLocaleString()) : []))),
    h("section", {}, h("h2", {}, "Daemon"), h("dl", {class: "facts"}, ...row("Version", sys.version),
      ...row("Hypervisor", sys.hypervisor), ...row("Listeners", sys.listeners.join(", ")),
      ...row("TLS fingerprint (SHA-256)", h("code", {"data-testid": "fingerprint"}, sys.tls_fingerprint || "no TLS listener")),
      ...row("Firewall", sys.firewall), ...row("Database", info.database),
      ...row("Bridges", info.bridges.map(([b, up]) => b + (up ? "" : " (missing)")).join(", ")))),
    h("section", {}, h("h2", {}, "Configuration"), h("pre", {class: "config"}, JSON.stringify(info.config, null, 2))));
  return {title: "System", el};
};

PAGES.notfound = async () => ({title: "Not found", el: h("p", {}, "No such page. ", h("a", {href: "#/"}, "Overview"))});
