//! Expose grammar: `[HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]`.
//! Parsed once at the edge (CLI and API) into types that cannot hold a bad value.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A bad expose specification; the message names the value and what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid port spec {spec:?}: {reason}")]
pub struct SpecError {
    /// The whole spec as the user typed it.
    pub spec: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

/// A TCP/UDP port number, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct Port(u16);

impl Port {
    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u16> for Port {
    type Error = String;
    fn try_from(v: u16) -> Result<Self, String> {
        if v == 0 {
            Err("port 0 is not allowed (allowed: 1-65535)".into())
        } else {
            Ok(Port(v))
        }
    }
}

impl From<Port> for u16 {
    fn from(p: Port) -> u16 {
        p.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An inclusive, non-empty range of ports (`start <= end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    start: Port,
    end: Port,
}

impl PortRange {
    /// A range; `None` when `end < start`.
    pub fn new(start: Port, end: Port) -> Option<Self> {
        (start <= end).then_some(PortRange { start, end })
    }
    /// A single port.
    pub fn single(p: Port) -> Self {
        PortRange { start: p, end: p }
    }
    /// First port.
    pub fn start(&self) -> Port {
        self.start
    }
    /// Last port (inclusive).
    pub fn end(&self) -> Port {
        self.end
    }
    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end.0 - self.start.0) + 1
    }
    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Whether two ranges share a port.
    pub fn overlaps(&self, o: &PortRange) -> bool {
        self.start <= o.end && o.start <= self.end
    }
    /// Every port of the range.
    pub fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        self.start.0..=self.end.0
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, the default.
    #[default]
    Tcp,
    /// UDP, written `/udp` after the port.
    Udp,
}

impl Protocol {
    /// Lower-case name as nftables and users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("protocol {s:?} is not supported (allowed: tcp, udp)")),
        }
    }
}

/// The host side of an expose: optional bound address, port range and protocol.
/// This is also what `unexpose --port` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostPortSpec {
    /// Host address the expose is bound to; `None` means every host address.
    pub bind: Option<Ipv4Addr>,
    /// Host ports.
    pub ports: PortRange,
    /// `tcp` or `udp` (default tcp).
    pub proto: Protocol,
}

/// A full expose: host side plus the machine's ports (same length as the host range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExposeSpec {
    /// Host side.
    pub host: HostPortSpec,
    /// Machine ports, as long as `host.ports`.
    pub machine: PortRange,
}

fn parse_port(spec: &str, s: &str) -> Result<Port, SpecError> {
    let err = |reason: String| SpecError {
        spec: spec.to_string(),
        reason,
    };
    if s.is_empty() {
        return Err(err("a port is missing (allowed: 1-65535)".into()));
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("{s:?} is not a port number (allowed: 1-65535)")));
    }
    let v: u32 = s
        .parse()
        .map_err(|_| err(format!("{s} is out of range (allowed: 1-65535)")))?;
    if v == 0 || v > 65535 {
        return Err(err(format!("{v} is out of range (allowed: 1-65535)")));
    }
    Ok(Port(v as u16))
}

fn parse_range(spec: &str, s: &str) -> Result<PortRange, SpecError> {
    match s.split_once('-') {
        None => Ok(PortRange::single(parse_port(spec, s)?)),
        Some((a, b)) => {
            let (a, b) = (parse_port(spec, a)?, parse_port(spec, b)?);
            PortRange::new(a, b).ok_or_else(|| SpecError {
                spec: spec.to_string(),
                reason: format!("range {a}-{b} ends before it starts (allowed: START-END with START <= END)"),
            })
        }
    }
}

fn split_proto(spec: &str) -> Result<(&str, Protocol), SpecError> {
    match spec.rsplit_once('/') {
        None => Ok((spec, Protocol::Tcp)),
        Some((rest, p)) => Ok((
            rest,
            p.parse().map_err(|reason| SpecError {
                spec: spec.to_string(),
                reason,
            })?,
        )),
    }
}

/// A bind address; `0.0.0.0` means every address, like no address at all (as in Docker).
fn parse_addr(spec: &str, s: &str) -> Result<Option<Ipv4Addr>, SpecError> {
    let a: Ipv4Addr = s.parse().map_err(|_| SpecError {
        spec: spec.to_string(),
        reason: format!("{s:?} is not an IPv4 address (allowed: a host address like 127.0.0.1)"),
    })?;
    Ok((!a.is_unspecified()).then_some(a))
}

impl FromStr for HostPortSpec {
    type Err = SpecError;
    /// `[HOST_IP:]HOST_PORT[-END][/tcp|/udp]`
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let s = spec.trim();
        let (rest, proto) = split_proto(s)?;
        let (bind, ports) = match rest.rsplit_once(':') {
            None => (None, rest),
            Some((a, p)) => (parse_addr(spec, a)?, p),
        };
        Ok(HostPortSpec {
            bind,
            ports: parse_range(spec, ports)?,
            proto,
        })
    }
}

impl FromStr for ExposeSpec {
    type Err = SpecError;
    /// `[HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]`
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let s = spec.trim();
        let (rest, proto) = split_proto(s)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (bind, host, machine) = match parts.as_slice() {
            [h] => (None, *h, *h),
            [h, m] => (None, *h, *m),
            [a, h, m] => (parse_addr(spec, a)?, *h, *m),
            _ => {
                return Err(SpecError {
                    spec: spec.to_string(),
                    reason:
                        "too many ':' (allowed: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp])"
                            .into(),
                });
            }
        };
        let host_r = parse_range(spec, host)?;
        let machine_r = parse_range(spec, machine)?;
        if host_r.len() != machine_r.len() {
            return Err(SpecError {
                spec: spec.to_string(),
                reason: format!(
                    "host range {host_r} has {} ports but machine range {machine_r} has {} (they must be the same length)",
                    host_r.len(),
                    machine_r.len()
                ),
            });
        }
        Ok(ExposeSpec {
            host: HostPortSpec {
                bind,
                ports: host_r,
                proto,
            },
            machine: machine_r,
        })
    }
}

impl fmt::Display for HostPortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(a) = self.bind {
            write!(f, "{a}:")?;
        }
        write!(f, "{}/{}", self.ports, self.proto)
    }
}

impl fmt::Display for ExposeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(a) = self.host.bind {
            write!(f, "{a}:")?;
        }
        write!(f, "{}:{}/{}", self.host.ports, self.machine, self.host.proto)
    }
}

impl ExposeSpec {
    /// The status line of the user's page: `host:8080 → machine:3000 (tcp)`,
    /// with the bound address when one is set (`host:127.0.0.1:8080 → ...`).
    pub fn status_line(&self) -> String {
        let bind = self.host.bind.map(|a| format!("{a}:")).unwrap_or_default();
        format!(
            "host:{bind}{} → machine:{} ({})",
            self.host.ports, self.machine, self.host.proto
        )
    }

    /// Machine port that host port `p` maps to.
    pub fn machine_port_for(&self, p: u16) -> u16 {
        self.machine.start().get() + (p - self.host.ports.start().get())
    }
}

/// Reject a list of exposes in which two claim the same host port (one command, `--expose` twice).
pub fn check_no_duplicates(specs: &[ExposeSpec]) -> Result<(), SpecError> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[..i] {
            if a.host.proto == b.host.proto
                && a.host.ports.overlaps(&b.host.ports)
                && (a.host.bind.is_none() || b.host.bind.is_none() || a.host.bind == b.host.bind)
            {
                return Err(SpecError {
                    spec: a.to_string(),
                    reason: format!(
                        "host port overlaps --expose {b} given in the same command (each host port may be exposed once)"
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ExposeSpec {
        s.parse().unwrap()
    }

    #[test]
    fn grammar_forms() {
        assert_eq!(p("80").to_string(), "80:80/tcp");
        assert_eq!(p("8080:3000").to_string(), "8080:3000/tcp");
        assert_eq!(p("53/udp").to_string(), "53:53/udp");
        assert_eq!(p("127.0.0.1:8080:80").to_string(), "127.0.0.1:8080:80/tcp");
        let r = p("8000-8010:9000-9010");
        assert_eq!(r.host.ports.len(), 11);
        assert_eq!(r.machine_port_for(8005), 9005);
        assert_eq!(p("8000-8002/UDP").host.proto, Protocol::Udp);
        assert_eq!(p("8080:3000").status_line(), "host:8080 → machine:3000 (tcp)");
        assert_eq!(
            p("127.0.0.1:8080:80").status_line(),
            "host:127.0.0.1:8080 → machine:80 (tcp)"
        );
    }

    #[test]
    fn bad_input_names_value() {
        for (s, needle) in [
            ("0", "0 is out of range"),
            ("65536", "65536 is out of range"),
            ("abc", "\"abc\" is not a port"),
            ("80:", "port is missing"),
            (":80", "port is missing"),
            ("80-70", "ends before it starts"),
            ("80-81:90", "same length"),
            ("80/sctp", "\"sctp\" is not supported"),
            ("999.1.1.1:80:80", "not an IPv4 address"),
            ("1:2:3:4", "too many"),
        ] {
            let e = s.parse::<ExposeSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{s}: {e}");
            assert!(e.contains(&format!("{s:?}")), "{s}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn host_spec_for_unexpose() {
        let h: HostPortSpec = "8080".parse().unwrap();
        assert_eq!(
            (h.proto, h.ports.start().get(), h.bind),
            (Protocol::Tcp, 8080, None)
        );
        let h: HostPortSpec = "8080/udp".parse().unwrap();
        assert_eq!(h.proto, Protocol::Udp);
        let h: HostPortSpec = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(h.bind, Some(Ipv4Addr::LOCALHOST));
        let any: ExposeSpec = "0.0.0.0:8080:80".parse().unwrap();
        assert_eq!(
            (any.host.bind, any.to_string().as_str()),
            (None, "8080:80/tcp"),
            "0.0.0.0 is the wildcard"
        );
    }

    #[test]
    fn duplicates_in_one_command() {
        assert!(check_no_duplicates(&[p("80"), p("80")]).is_err());
        assert!(check_no_duplicates(&[p("8000-8010"), p("8005:80")]).is_err());
        assert!(check_no_duplicates(&[p("127.0.0.1:80:80"), p("80")]).is_err());
        assert!(check_no_duplicates(&[p("80"), p("80/udp")]).is_ok());
        assert!(check_no_duplicates(&[p("127.0.0.1:80:80"), p("127.0.0.2:80:80")]).is_ok());
    }
}
