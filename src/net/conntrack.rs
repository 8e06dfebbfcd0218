//! Forgetting connection-tracking entries: removing a DNAT element stops new flows only; an
//! established flow (UDP above all, which never "closes") keeps its NAT binding and would keep
//! reaching the old target, or the next machine that gets its address. So an unexpose forgets
//! the flows of the removed ports, and a machine that stops or gives its address back forgets
//! every flow from, to or answered by that address.
//!
//! Done with the `conntrack` program (Debian package `conntrack`), off the expose path; every
//! failure is logged, never returned: the rules are already right, this only cuts old flows.

use crate::spec::ExposeSpec;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

/// Above this many ports, a range is forgotten by protocol and address rather than port by
/// port (one process per port).
const MAX_PORTS_ONE_BY_ONE: usize = 64;

/// The filters (`conntrack -D` arguments) that select the flows of `ip`: sent by it, sent to
/// it, or answered by it (inbound DNATed flows, whose original destination is the host).
pub fn machine_filters(ip: Ipv4Addr) -> Vec<Vec<String>> {
    ["--orig-src", "--orig-dst", "--reply-src"]
        .iter()
        .map(|f| vec![f.to_string(), ip.to_string()])
        .collect()
}

/// The filters that select the DNATed flows of `specs` towards the machine at `ip`: answered
/// by `ip` from the machine port, sent to the host port (and bound address).
pub fn expose_filters(ip: Ipv4Addr, specs: &[ExposeSpec]) -> Vec<Vec<String>> {
    let mut out = vec![];
    for s in specs {
        let proto = s.host.proto.to_string();
        let base = vec!["-p".to_string(), proto, "--reply-src".into(), ip.to_string()];
        let ports: Vec<u16> = s.host.ports.ports().collect();
        if ports.len() > MAX_PORTS_ONE_BY_ONE {
            out.push(base);
            continue;
        }
        for p in ports {
            let mut f = base.clone();
            f.extend([
                "--reply-port-src".into(),
                s.machine_port_for(p).to_string(),
                "--orig-port-dst".into(),
                p.to_string(),
            ]);
            if let Some(b) = s.host.bind {
                f.extend(["--orig-dst".into(), b.to_string()]);
            }
            out.push(f);
        }
    }
    out
}

/// Forget every flow of the machine address `ip` (a machine stopped, died or was deleted).
pub async fn forget_machine(ip: Ipv4Addr) {
    run_all(machine_filters(ip), &format!("address {ip}")).await;
}

/// Forget the DNATed flows of exposes `specs` of the machine at `ip` (they were unexposed).
pub async fn forget_exposes(ip: Ipv4Addr, specs: &[ExposeSpec]) {
    run_all(expose_filters(ip, specs), &format!("exposes of {ip}")).await;
}

/// How many entries a `conntrack -D` said it deleted (it exits 1 when that is none).
pub fn deleted_count(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        l.split("): ")
            .nth(1)?
            .strip_suffix(" flow entries have been deleted.")?
            .parse()
            .ok()
    })
}

async fn run_all(filters: Vec<Vec<String>>, what: &str) {
    static MISSING_LOGGED: AtomicBool = AtomicBool::new(false);
    let mut total = 0;
    for f in filters {
        let out = tokio::process::Command::new("conntrack")
            .arg("-D")
            .args(&f)
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !MISSING_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "conntrack is not installed (apt-get install conntrack): old flows of removed exposes and released addresses are not cut"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, what, "running conntrack failed");
                return;
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                match deleted_count(&err) {
                    Some(n) => total += n,
                    None => tracing::warn!(what, filter = ?f, stderr = %err.trim(), "conntrack -D failed"),
                }
            }
        }
    }
    if total > 0 {
        tracing::info!(what, flows = total, "forgot connection-tracking entries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_per_port_and_bound() {
        let ip: Ipv4Addr = "10.200.0.2".parse().unwrap();
        let s: ExposeSpec = "127.0.0.1:8080-8081:80-81/udp".parse().unwrap();
        let f = expose_filters(ip, &[s]);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[1].join(" "),
            "-p udp --reply-src 10.200.0.2 --reply-port-src 81 --orig-port-dst 8081 --orig-dst 127.0.0.1"
        );
        let wide: ExposeSpec = "20000-29999:80"
            .parse()
            .unwrap_or_else(|_| "20000-29999".parse().unwrap());
        assert_eq!(
            expose_filters(ip, &[wide])[0].join(" "),
            "-p tcp --reply-src 10.200.0.2"
        );
        assert_eq!(machine_filters(ip).len(), 3);
    }

    #[test]
    fn deleted_count_reads_conntrack_stderr() {
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"),
            Some(0)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): 12 flow entries have been deleted."),
            Some(12)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted"),
            None
        );
    }
}
