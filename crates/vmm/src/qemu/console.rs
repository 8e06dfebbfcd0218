//! Reading a machine's console and QEMU logs after the fact: the tail for humans, and the
//! diagnosis a failed boot reports (our init's messages, the kernel's panic line).

use super::{Qemu, console_path};
use crate::{MachineSpec, VmmError, logring};

/// How much of a log's end a diagnosis reads (the files themselves are capped, not small).
const DIAGNOSIS_BYTES: u64 = 64 << 10;

/// `s` without terminal control sequences (CSI, OSC and other escapes) and control characters
/// other than newline and tab (C1 ones included): what a guest wrote cannot drive the terminal
/// an error message is printed on.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => match it.next() {
                // CSI: parameters and intermediates up to a final byte in 0x40..=0x7e
                Some('[') => {
                    for c in it.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC, DCS, SOS, PM, APC: up to BEL or ESC \
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    while let Some(c) = it.next() {
                        if c == '\x07' || (c == '\x1b' && it.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The non-empty lines of this boot's console (the live file's end), made printable.
fn console_lines(spec: &MachineSpec) -> Vec<String> {
    let text = last_bytes(&console_path(spec), DIAGNOSIS_BYTES);
    printable(&String::from_utf8_lossy(&text))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The last `n` bytes of the file at `path` (none when it cannot be read).
fn last_bytes(path: &std::path::Path, n: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let mut buf = Vec::new();
    let _ = f
        .seek(SeekFrom::Start(len.saturating_sub(n)))
        .and_then(|_| f.take(n).read_to_end(&mut buf));
    buf
}

/// The last `n` lines of a machine's console log.
pub fn console_tail(spec: &MachineSpec, n: usize) -> String {
    let lines = console_lines(spec);
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the console says about a failed boot: our init's messages and the kernel's panic line
/// (a stack trace would push them out of a plain tail), then the last lines.
fn console_diagnosis(spec: &MachineSpec) -> String {
    let lines = console_lines(spec);
    let mut out: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains("sistemo-init:") || l.contains("Kernel panic") || l.contains("FATAL"))
        .collect();
    out.truncate(8);
    for l in &lines[lines.len().saturating_sub(6)..] {
        if !out.contains(&l.as_str()) {
            out.push(l);
        }
    }
    out.join("\n")
}

impl Qemu {
    /// A [`VmmError::Boot`] for `spec` with `reason`, the console's diagnosis and the end of
    /// `qemu.log`.
    pub(super) fn boot_error(&self, spec: &MachineSpec, reason: &str) -> VmmError {
        let mut tail = console_diagnosis(spec);
        let qlog = logring::tail(&spec.dir.join("qemu.log"), DIAGNOSIS_BYTES);
        let qlog = printable(&String::from_utf8_lossy(&qlog));
        let qlines: Vec<&str> = qlog.lines().filter(|l| !l.trim().is_empty()).collect();
        if !qlines.is_empty() {
            tail.push_str("\nqemu.log:\n");
            tail.push_str(&qlines[qlines.len().saturating_sub(5)..].join("\n"));
        }
        VmmError::Boot {
            name: spec.name.clone(),
            reason: if tail.is_empty() {
                reason.to_string()
            } else {
                format!("{reason}; console:\n{tail}")
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_keeps_init_messages_ahead_of_a_long_trace() {
        let dir = std::env::temp_dir().join(format!("sistemo-console-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = String::from(
            "boot\x1b]0;pwned\x07\r\nsistemo-init: FATAL: cannot mount \x1b[2J/dev/vda as ext4\u{9b}31m\r\n",
        );
        log.push_str("Kernel panic - not syncing: Attempted to kill init!\n");
        for i in 0..40 {
            log.push_str(&format!("trace line {i}\n\n"));
        }
        std::fs::write(dir.join("console.log"), log).unwrap();
        let spec = MachineSpec {
            id: uuid::Uuid::nil(),
            name: "m".into(),
            vcpus: 1,
            memory_mib: 128,
            dir: dir.clone(),
            disk: None,
            net: crate::NetAttachment {
                host_ifname: "t".into(),
                bridge: "b".into(),
                mac: [0; 6],
                ip: "10.0.0.2".parse().unwrap(),
                prefix: 24,
                gateway: "10.0.0.1".parse().unwrap(),
                dns: vec![],
            },
            ssh_pubkey: None,
            volumes: vec![],
            io: crate::IoLimits::default(),
            slot: 0,
            cpu_limit_milli: 0,
        };
        let d = console_diagnosis(&spec);
        assert!(
            d.starts_with("sistemo-init: FATAL: cannot mount /dev/vda as ext431m\n"),
            "{d}"
        );
        assert!(
            !d.contains(['\x1b', '\x07', '\u{9b}']) && !d.contains("pwned"),
            "{d:?}"
        );
        assert!(d.contains("Kernel panic") && d.ends_with("trace line 39"), "{d}");
        assert_eq!(console_tail(&spec, 2), "trace line 38\ntrace line 39");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
