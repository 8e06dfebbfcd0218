//! How the CLI shows things: JSON, aligned tables, the page's status block, progress of long
//! operations, and confirmation prompts.

use crate::api::MachineInfo;
use anyhow::{Result, bail};
use std::io::IsTerminal;

/// Print `v` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Print a table with left-aligned columns two spaces apart.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// The page's status block.
pub fn format_status(m: &MachineInfo) -> String {
    let degraded = match (&m.degraded, m.exit_code) {
        (Some(_), _) => " (degraded)".to_string(),
        (None, Some(c)) => format!(" (workload exited with code {c})"),
        _ => String::new(),
    };
    let mut s = format!(
        "ID:       {}\nName:     {}\nStatus:   {}{degraded}\nIP:       {}\n",
        m.id, m.name, m.status, m.ip
    );
    if let Some(d) = &m.degraded {
        s.push_str(&format!("Degraded: {d}\n"));
    }
    if let Some(e) = &m.error {
        s.push_str(&format!("Error:    {e}\n"));
    }
    if let Some(p) = &m.paused {
        s.push_str(&format!("Paused:   {p}\n"));
    }
    if m.ports.is_empty() {
        s.push_str("Ports:    none\n");
    } else {
        s.push_str("Ports:\n");
        for p in &m.ports {
            s.push_str(&format!("  {}\n", p.display));
        }
    }
    // After the page's block, what a Sistemo user also finds there.
    let disk = if m.storage_bytes == 0 {
        "-".to_string()
    } else {
        crate::domain::ByteSize::bytes(m.storage_bytes).to_string()
    };
    let image = match &m.image_digest {
        Some(d) => format!("{} (sha256:{})", m.image, &d[..d.len().min(12)]),
        None => m.image.clone(),
    };
    s.push_str(&format!(
        "Image:    {image}\nNetwork:  {}\nvCPUs:    {}\nMemory:   {}\nDisk:     {disk}\nCreated:  {}\n",
        m.network,
        m.vcpus,
        crate::domain::ByteSize::mib(m.memory_mib),
        m.created_at
    ));
    if let Some(pid) = m.pid {
        s.push_str(&format!("PID:      {pid}\n"));
    }
    if let Some(w) = &m.workload {
        s.push_str(&super::workload::status_lines(w));
    }
    if !m.vmm.is_empty() {
        let note = if m.vmm.ends_with("tcg") {
            " (TCG: emulated, not an isolation boundary)"
        } else {
            ""
        };
        s.push_str(&format!("VMM:      {}{note}\n", m.vmm));
    }
    if let Some(t) = &m.template {
        s.push_str(&format!(
            "Started:  from template {} (warm; `image list` shows it)\n",
            &t[..t.len().min(12)]
        ));
    }
    if !m.volumes.is_empty() {
        s.push_str("Volumes:\n");
        for v in &m.volumes {
            let mut how = vec![if v.readonly { "ro" } else { "rw" }.to_string()];
            if v.root {
                how.push("root disk".into());
            }
            if let Some(p) = &v.mount {
                how.push(format!("mounted at {p}"));
            }
            s.push_str(&format!("  {} ({})\n", v.volume, how.join(", ")));
        }
    }
    if let Some(io) = io_line(&m.io) {
        s.push_str(&format!("I/O:      {io}\n"));
    }
    if let Some(l) = &m.limits {
        s.push_str(&format!(
            "Limits:   memory {}, {} CPU, {} tasks\n",
            crate::domain::ByteSize::mib(l.memory_mib),
            l.cpus,
            l.pids
        ));
    }
    if let Some(g) = &m.guest {
        let b = crate::domain::ByteSize::bytes;
        s.push_str(&format!(
            "Guest:    up {}s, memory {} of {}, disk {} of {}, init {}{}, agent {}\n",
            g.uptime_s,
            b(g.mem_used_kib * 1024),
            b(g.mem_total_kib * 1024),
            b(g.disk_used),
            b(g.disk_total),
            g.init,
            if g.init_ready { "" } else { " (starting)" },
            g.agent
        ));
        for a in &g.addresses {
            s.push_str(&format!("  {a}\n"));
        }
    }
    s
}

/// A machine's rate limits in words, e.g. `download 100 Mbit/s, disk 300 IOPS`; `None` when
/// nothing is limited.
fn io_line(io: &sistemo_vmm::IoLimits) -> Option<String> {
    let parts: Vec<String> = [
        (io.download_mbps, "download", "Mbit/s"),
        (io.upload_mbps, "upload", "Mbit/s"),
        (io.iops, "disk", "IOPS"),
        (io.disk_bw_mbps, "disk", "MiB/s"),
    ]
    .into_iter()
    .filter(|(v, ..)| *v > 0)
    .map(|(v, what, unit)| format!("{what} {v} {unit}"))
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Progress of a long operation on stderr: a spinner with elapsed time on a terminal, plain
/// lines otherwise. The spinner is cleared when dropped.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        Progress { bar }
    }

    fn line(&self, p: &str) {
        match &self.bar {
            Some(b) => {
                b.println(format!("… {p}"));
                b.set_message(p.to_string());
            }
            None => eprintln!("… {p}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress callback for a streamed operation.
pub fn progress_printer() -> impl FnMut(&str) {
    let p = Progress::new();
    move |line: &str| p.line(line)
}

/// Ask before a destructive command unless `-y`; refuse when there is no terminal to ask on.
pub fn confirm(yes: bool, what: &str) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to {what} without confirmation: no terminal to ask on; pass -y to confirm");
    }
    eprint!("{what}? [y/N] ");
    let mut a = String::new();
    std::io::stdin().read_line(&mut a)?;
    if matches!(a.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("not confirmed; nothing was changed")
    }
}

/// `b` without terminal control sequences (CSI, OSC and other escapes) and control characters
/// other than newline, tab and carriage return: what a guest wrote cannot drive the terminal.
pub fn without_escapes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            0x1b => {
                i += 1;
                match b.get(i) {
                    // CSI: parameters and intermediates up to a final byte in 0x40..=0x7e
                    Some(b'[') => {
                        i += 1;
                        while i < b.len() && !(0x40..=0x7e).contains(&b[i]) {
                            i += 1;
                        }
                    }
                    // OSC, DCS, SOS, PM, APC: up to BEL or ESC \
                    Some(b']' | b'P' | b'X' | b'^' | b'_') => {
                        while i < b.len() && b[i] != 0x07 && !(b[i] == 0x1b && b.get(i + 1) == Some(&b'\\')) {
                            i += 1;
                        }
                        if b.get(i) == Some(&0x1b) {
                            i += 1;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            b'\n' | b'\t' | b'\r' => {
                out.push(b[i]);
                i += 1;
            }
            c if c < 0x20 || c == 0x7f => i += 1,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_escapes_are_removed() {
        let guest = b"\x1b[2J\x1b[1;31mred\x1b[0m ok\x1b]0;title\x07 \x1b]52;c;aGk=\x1b\\done\x07\x08\n\tend";
        assert_eq!(without_escapes(guest), b"red ok done\n\tend");
        assert_eq!(without_escapes("é ✓".as_bytes()), "é ✓".as_bytes());
    }

    #[test]
    fn status_shows_the_images_digest() {
        let mut m: MachineInfo = serde_json::from_value(serde_json::json!({
            "id": "00000000-0000-0000-0000-000000000000", "name": "web", "status": "running",
            "ip": "10.200.0.2", "network": "default", "image": "debian", "vcpus": 2,
            "memory_mib": 1024, "storage_bytes": 0, "ports": [], "created_at": "2026-01-01T00:00:00Z",
            "image_digest": "0123456789abcdef".repeat(4),
        }))
        .unwrap();
        let s = format_status(&m);
        assert!(
            s.lines().any(|l| l == "Image:    debian (sha256:0123456789ab)"),
            "{s}"
        );
        m.image_digest = None;
        let s = format_status(&m);
        assert!(s.lines().any(|l| l == "Image:    debian"), "{s}");
    }
}
