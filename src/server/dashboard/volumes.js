// sistemo dashboard: the volumes page. Volumes and snapshots with size, format, attachments
// and snapshots; for admins, forms to create, snapshot, clone, attach and detach (stopped
// machines), and delete (refused while attached: the API's error is shown). Kept current by
// the event stream (audit entries of volume and machine changes).
"use strict";

PAGES.volumes = async () => {
  const body = h("tbody");
  const alert = h("p", {class: "form-error", role: "alert", "data-testid": "volumes-error"});
  let vols = [];
  const attachedText = (v) => v.attached_to.map((a) => a.machine + (a.mount ? ":" + a.mount : "") +
    (a.readonly ? " (ro)" : "") + (a.root ? " (root)" : "")).join(", ");
  const snapshotsOf = (v) => vols.filter((s) => s.kind === "snapshot" && s.source === "volume " + v.name).map((s) => s.name);

  async function del(v, btn) {
    if (!confirm("Delete " + v.kind + " " + v.name + "? Its data is lost.")) return;
    alert.textContent = "";
    btn.disabled = true;
    try { await api("DELETE", "/v1/volumes/" + encodeURIComponent(v.name)); toast("Deleted " + v.name); await draw(); }
    catch (e) { alert.textContent = e.message; btn.disabled = false; }
  }

  async function detach(a, btn) {
    alert.textContent = "";
    btn.disabled = true;
    try {
      await api("DELETE", "/v1/machines/" + encodeURIComponent(a.machine) + "/volumes/" + encodeURIComponent(a.volume));
      toast("Detached " + a.volume + " from " + a.machine);
      await draw();
    } catch (e) { alert.textContent = e.message; btn.disabled = false; }
  }

  const row = (v) => {
    const snaps = snapshotsOf(v);
    const acts = isAdmin() ? h("div", {class: "actions"},
      v.attached_to.filter((a) => !a.root).map((a) => h("button", {"data-action": "detach",
        onclick: (ev) => detach(a, ev.target)}, "Detach from " + a.machine)),
      h("button", {class: "danger", "data-action": "delete", onclick: (ev) => del(v, ev.target)}, "Delete")) : null;
    return h("tr", {"data-volume": v.name, "data-kind": v.kind},
      h("td", {}, v.name), h("td", {}, v.kind), h("td", {}, v.format),
      h("td", {"data-field": "size"}, bytes(v.size_bytes)),
      h("td", {"data-field": "attached"}, attachedText(v) || "-"),
      h("td", {"data-field": "snapshots"}, snaps.join(", ") || "-"),
      h("td", {class: "hint"}, v.source || "-"), h("td", {}, acts));
  };

  // Sources a snapshot or clone may start from, and machines to attach to, in the forms' selects.
  const fromSelect = h("select", {name: "from"});
  const volSelect = h("select", {name: "volume"});
  const machineSelect = h("select", {name: "machine"});
  const fillSelects = () => {
    const keep = (sel, opts) => {
      const was = sel.value;
      sel.replaceChildren(...opts.map(([value, label]) => h("option", {value}, label)));
      if (opts.some(([value]) => value === was)) sel.value = was;
    };
    keep(fromSelect, vols.map((v) => [v.name, v.name + " (" + v.kind + ")"]));
    keep(volSelect, vols.filter((v) => v.kind === "volume").map((v) => [v.name, v.name]));
    keep(machineSelect, [...S.machines.values()].sort((a, b) => a.name.localeCompare(b.name))
      .map((m) => [m.name, m.name + " (" + m.status + ")"]));
  };

  const draw = async () => {
    try { vols = await api("GET", "/v1/volumes"); } catch (e) {
      body.replaceChildren(h("tr", {}, h("td", {colspan: 8, class: "empty"}, e.message)));
      return;
    }
    vols.sort((a, b) => a.name.localeCompare(b.name));
    body.replaceChildren(...vols.map(row));
    if (!vols.length) body.append(h("tr", {}, h("td", {colspan: 8, class: "empty"}, "No volumes yet.")));
    fillSelects();
  };
  await draw();

  const forms = [];
  if (isAdmin()) {
    // Create.
    const c = {
      size: field("Size", h("input", {name: "size", required: true, placeholder: "5G", autocomplete: "off"}), "e.g. 512M, 5G"),
      name: field("Name", h("input", {name: "name", placeholder: "generated", pattern: "[a-z0-9-]+", autocomplete: "off"}), "a-z, 0-9, '-'"),
      format: field("Format", h("select", {name: "format"}, ["ext4", "raw"].map((f) => h("option", {value: f}, f)))),
    };
    c.size.match = ["size", "storage", "free", "limit"]; c.name.match = ["name", "exists"]; c.format.match = ["format"];
    const cErr = h("p", {class: "form-error", role: "alert"});
    const create = h("form", {class: "card inline", "aria-label": "Create a volume"}, c.size, c.name, c.format,
      h("button", {type: "submit", class: "primary"}, "Create"), cErr);
    create.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(c, cErr);
      if (!c.size.input.value.trim()) { c.size.setError("Enter a size, e.g. 5G."); c.size.input.focus(); return; }
      try {
        const v = await stream("POST", "/v1/volumes", {size: c.size.input.value.trim(),
          name: c.name.input.value.trim() || null, format: c.format.input.value}, () => {});
        c.size.input.value = ""; c.name.input.value = "";
        toast("Created " + v.name);
        await draw();
      } catch (e) { showError(e, c, cErr); }
    });

    // Snapshot or clone.
    const s = {
      from: field("From", fromSelect, "a volume (snapshot or clone) or a snapshot (clone)"),
      name: field("New name", h("input", {name: "new", required: true, pattern: "[a-z0-9-]+", autocomplete: "off"})),
    };
    s.from.match = ["snapshot already", "does not exist"]; s.name.match = ["name", "exists"];
    const sErr = h("p", {class: "form-error", role: "alert"});
    const copy = (op) => async (ev) => {
      ev.preventDefault();
      clearErrors(s, sErr);
      const name = s.name.input.value.trim();
      if (!name) { s.name.setError("Enter the new " + (op === "snapshot" ? "snapshot's" : "volume's") + " name."); s.name.input.focus(); return; }
      try {
        await stream("POST", "/v1/volumes/" + encodeURIComponent(s.from.input.value) + "/" + op, {name}, () => {});
        s.name.input.value = "";
        toast((op === "snapshot" ? "Snapshot " : "Clone ") + name + " made");
        await draw();
      } catch (e) { showError(e, s, sErr); }
    };
    const snapshot = h("form", {class: "card inline", "aria-label": "Snapshot or clone"}, s.from, s.name,
      h("button", {type: "submit", class: "primary"}, "Snapshot"),
      h("button", {type: "button", onclick: copy("clone")}, "Clone"), sErr);
    snapshot.addEventListener("submit", copy("snapshot"));

    // Attach to a stopped machine.
    const a = {
      volume: field("Volume", volSelect),
      machine: field("Machine", machineSelect, "stopped; applied at its next start"),
      mount: field("Mount point", h("input", {name: "mount", placeholder: "/data", autocomplete: "off"}), "ext4 volumes; empty: not mounted"),
      readonly: field("Read-only", h("input", {name: "readonly", type: "checkbox"})),
    };
    // Errors go to the machine first (a running one is named with the volume), then the mount.
    a.machine.match = ["machine", "running", "stopped"]; a.mount.match = ["mount"];
    a.volume.match = ["volume", "attached", "raw"];
    const aErr = h("p", {class: "form-error", role: "alert"});
    const attach = h("form", {class: "card inline", "aria-label": "Attach a volume"}, a.volume, a.machine, a.mount, a.readonly,
      h("button", {type: "submit", class: "primary"}, "Attach"), aErr);
    attach.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors(a, aErr);
      try {
        await api("POST", "/v1/machines/" + encodeURIComponent(a.machine.input.value) + "/volumes",
          {volume: a.volume.input.value, mount: a.mount.input.value.trim() || null, readonly: a.readonly.input.checked});
        toast("Attached " + a.volume.input.value + " to " + a.machine.input.value);
        a.mount.input.value = "";
        await draw();
      } catch (e) { showError(e, {machine: a.machine, mount: a.mount, volume: a.volume}, aErr); }
    });
    forms.push(h("h2", {}, "Create"), create, h("h2", {}, "Snapshot or clone"), snapshot, h("h2", {}, "Attach"), attach);
  }

  const el = h("div", {}, alert, h("div", {class: "scroll"}, h("table", {}, h("thead", {}, h("tr", {},
    ["Name", "Kind", "Format", "Size", "Attached to", "Snapshots", "Source", ""].map((t) => h("th", {}, t)))), body)), ...forms);
  const volumeChange = (e) => e.action.startsWith("volume.") || e.action.startsWith("machine.volume.") ||
    ["machine.delete", "machine.snapshot", "machine.clone", "machine.deploy"].includes(e.action);
  return {title: "Volumes", el,
    onChange: (e) => { if (volumeChange(e)) draw(); },
    onMachine: () => fillSelects()};
};
