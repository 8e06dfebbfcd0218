//! The domain's vocabulary: machine states, hypervisor kinds, names, sizes and subnets.
//! Each type is parsed once at the edge (API request, config file) and cannot hold a bad value.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A value that does not parse; the message names the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Where a machine is in its life. Only the store turns it into text and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Deploy in progress: disk, link and VMM are being made.
    Creating,
    /// Booting from stopped.
    Starting,
    /// The VMM runs and the guest answered; its port rules are in the firewall.
    Running,
    /// Graceful stop in progress.
    Stopping,
    /// No VMM; rules stay stored, out of the firewall.
    Stopped,
    /// Delete in progress: its rules are out of the firewall and no rebuild brings them back.
    Deleting,
    /// The VMM failed to start or died unexpectedly; `start` retries.
    Error,
}

impl MachineState {
    /// Every state, for parsing and tests.
    pub const ALL: [MachineState; 7] = [
        MachineState::Creating,
        MachineState::Starting,
        MachineState::Running,
        MachineState::Stopping,
        MachineState::Stopped,
        MachineState::Deleting,
        MachineState::Error,
    ];

    /// The lower-case name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Creating => "creating",
            MachineState::Starting => "starting",
            MachineState::Running => "running",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Deleting => "deleting",
            MachineState::Error => "error",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineState {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        MachineState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Invalid(format!("machine state {s:?} is unknown")))
    }
}

/// What happens when a machine's VMM ends by itself (Docker's restart policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restarted: a dead machine stays `error`, a powered-off one `stopped`.
    #[default]
    No,
    /// Restarted, with back-off, when its VMM died (not when the guest powered off).
    OnFailure,
    /// Restarted, with back-off, whenever its VMM ended by itself (not after `machine stop`).
    Always,
}

impl RestartPolicy {
    /// The name used in the API, the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RestartPolicy {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        [RestartPolicy::No, RestartPolicy::OnFailure, RestartPolicy::Always]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Invalid(format!(
                    "restart policy {s:?} is not known (allowed: no, on-failure, always)"
                ))
            })
    }
}

/// How far `machine deploy` waits for its guest (`--wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitFor {
    /// The guest agent answers: `exec`, `shell` and `cp` work (the image's init may still be
    /// starting its services).
    #[default]
    Agent,
    /// The image's init takes commands too (`systemctl` works).
    Init,
    /// The guest's own sshd answers too, for tools that need it.
    Ssh,
}

impl FromStr for WaitFor {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "agent" => Ok(WaitFor::Agent),
            "init" => Ok(WaitFor::Init),
            "ssh" => Ok(WaitFor::Ssh),
            _ => Err(Invalid(format!(
                "wait {s:?} is not valid (allowed: agent, init, ssh)"
            ))),
        }
    }
}

/// Which hypervisor backend runs the machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// QEMU microVMs (KVM where the guest can run under it, else TCG).
    #[default]
    Qemu,
    /// Machines are network namespaces running host programs: fast tests, no kernel.
    Netns,
}

impl FromStr for HypervisorKind {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "qemu" => Ok(HypervisorKind::Qemu),
            "netns" => Ok(HypervisorKind::Netns),
            _ => Err(Invalid(format!(
                "hypervisor {s:?} is not supported (allowed: qemu, netns)"
            ))),
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Netns => "netns",
        })
    }
}

/// The one rule behind every name: length and character set, and no `-` at either end.
fn check_name(what: &str, v: &str, max: usize, charset: Charset) -> Result<(), Invalid> {
    let ok_char = |b: u8| match charset {
        Charset::LowerDash => b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
        Charset::Ident => b.is_ascii_alphanumeric() || b == b'-' || b == b'_',
    };
    let allowed = match charset {
        Charset::LowerDash => "a-z, 0-9, '-', not '-' at either end",
        Charset::Ident => "a-z, A-Z, 0-9, '-', '_'",
    };
    if v.is_empty() || v.len() > max {
        return Err(Invalid(format!(
            "{what} {v:?} must be 1-{max} characters long (allowed: {allowed})"
        )));
    }
    let dash_end = charset == Charset::LowerDash && (v.starts_with('-') || v.ends_with('-'));
    if !v.bytes().all(ok_char) || dash_end {
        return Err(Invalid(format!(
            "{what} {v:?} has characters that are not allowed (allowed: {allowed})"
        )));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Charset {
    LowerDash,
    Ident,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $t:ident, $what:literal, $max:literal, $cs:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = Invalid;
            fn try_from(s: String) -> Result<Self, Invalid> {
                s.parse()
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, o: &str) -> bool {
                self.0 == o
            }
        }
    };
}

name_type!(
    /// A machine's name: 1-63 of `[a-z0-9-]`, no `-` at either end, and never a UUID (lookups
    /// take a name or an id, so a name shaped like an id could shadow another machine).
    MachineName, "machine name", 63, Charset::LowerDash
);
name_type!(
    /// A network's name: 1-11 of `[a-z0-9-]` (its bridge is `sis-NAME`: 15 bytes at most).
    NetworkName, "network name", 11, Charset::LowerDash
);
name_type!(
    /// A local image's tag: 1-63 of `[a-z0-9-]`.
    ImageTag, "image name", 63, Charset::LowerDash
);
name_type!(
    /// A host interface name sistemo creates (a bridge): 1-15 of `[A-Za-z0-9_-]`.
    IfName, "interface name", 15, Charset::Ident
);
name_type!(
    /// sistemo's nftables table: 1-64 of `[A-Za-z0-9_-]`.
    TableName, "nft_table", 64, Charset::Ident
);

impl FromStr for MachineName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        check_name("machine name", s, 63, Charset::LowerDash)?;
        if uuid::Uuid::try_parse(s).is_ok() {
            return Err(Invalid(format!(
                "machine name {s:?} has the form of a machine ID (allowed: a name that is not a UUID)"
            )));
        }
        Ok(MachineName(s.to_string()))
    }
}

impl MachineName {
    /// A generated name, `m-` and 8 hex digits.
    pub fn generate() -> MachineName {
        MachineName(format!("m-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }
}

/// A volume's (or snapshot's) name: the rules of a machine's name (1-63 of `[a-z0-9-]`, no
/// `-` at either end, never a UUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(MachineName);

impl VolumeName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// A generated name, `vol-` and 8 hex digits.
    pub fn generate() -> VolumeName {
        VolumeName(MachineName(format!(
            "vol-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )))
    }
}

impl FromStr for VolumeName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        s.parse::<MachineName>().map(VolumeName).map_err(|e| {
            Invalid(
                e.0.replacen("machine name", "volume name", 1)
                    .replace("machine ID", "volume ID"),
            )
        })
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for VolumeName {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        s.parse()
    }
}

impl From<VolumeName> for String {
    fn from(n: VolumeName) -> String {
        n.as_str().to_string()
    }
}

impl FromStr for NetworkName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        check_name("network name", s, 11, Charset::LowerDash).map(|_| NetworkName(s.to_string()))
    }
}

impl NetworkName {
    /// The built-in network every daemon has.
    pub fn default_network() -> NetworkName {
        NetworkName("default".into())
    }

    /// The bridge of a network created with `network create`.
    pub fn bridge(&self) -> IfName {
        IfName(format!("sis-{}", self.0))
    }
}

impl FromStr for ImageTag {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        check_name("image name", s, 63, Charset::LowerDash).map(|_| ImageTag(s.to_string()))
    }
}

impl FromStr for IfName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        check_name("interface name", s, 15, Charset::Ident).map(|_| IfName(s.to_string()))
    }
}

impl FromStr for TableName {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        check_name("nft_table", s, 64, Charset::Ident).map(|_| TableName(s.to_string()))
    }
}

/// A size in bytes, written like `512M`, `2G`, `2GB`, `10GiB`, `1024K` or `4096B`; a bare
/// number means MiB (as `--memory 512`). Units are binary (1K = 1024). In configuration files
/// it is written the same way (`max_storage: 256G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ByteSize(u64);

impl TryFrom<String> for ByteSize {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        ByteSize::parse("size", &s)
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl ByteSize {
    /// A size of `b` bytes.
    pub const fn bytes(b: u64) -> ByteSize {
        ByteSize(b)
    }

    /// A size of `m` MiB.
    pub const fn mib(m: u64) -> ByteSize {
        ByteSize(m << 20)
    }

    /// The size in bytes.
    pub fn as_bytes(self) -> u64 {
        self.0
    }

    /// The size in whole MiB (rounded down).
    pub fn as_mib(self) -> u64 {
        self.0 >> 20
    }

    /// Parse `s`, naming it as `what` in the error.
    pub fn parse(what: &str, s: &str) -> Result<ByteSize, Invalid> {
        let bad = || {
            Invalid(format!(
                "{what} {s:?} is not a size (allowed: a positive number with K, M, G or T, like 512M, 2G, 2GB or 10GiB)"
            ))
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mb" | "mib" => 20,
            "b" => 0,
            "k" | "kb" | "kib" => 10,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(bad()),
        };
        if n == 0 {
            return Err(Invalid(format!("{what} {s:?} must be greater than zero")));
        }
        n.checked_mul(1 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly, like `512M` or `2G`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// An IPv4 subnet sistemo may put a network on: a network address (no host bits) with a
/// prefix from /8 to /29.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet(Ipv4Net);

impl Subnet {
    /// Parse `s`, naming it as `what` in the error.
    pub fn parse(what: &str, s: &str) -> Result<Subnet, Invalid> {
        let n: Ipv4Net = s.trim().parse().map_err(|_| {
            Invalid(format!(
                "{what} {s:?} is not a CIDR (allowed: a network address with prefix /8 to /29, like 10.201.0.0/24)"
            ))
        })?;
        Subnet::check(what, n)
    }

    /// Check an already parsed network.
    pub fn check(what: &str, n: Ipv4Net) -> Result<Subnet, Invalid> {
        if !(8..=29).contains(&n.prefix_len()) {
            return Err(Invalid(format!(
                "{what} {n} has prefix /{} (allowed: /8 to /29)",
                n.prefix_len()
            )));
        }
        if n.trunc() != n {
            return Err(Invalid(format!(
                "{what} {n} has host bits set (allowed: a network address; did you mean {}?)",
                n.trunc()
            )));
        }
        Ok(Subnet(n))
    }

    /// The network.
    pub fn net(self) -> Ipv4Net {
        self.0
    }

    /// Whether the two share any address.
    pub fn overlaps(self, o: Ipv4Net) -> bool {
        self.0.contains(&o.network()) || o.contains(&self.0.network())
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Subnet {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        Subnet::parse("subnet", s)
    }
}

impl TryFrom<String> for Subnet {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.0.to_string()
    }
}

/// A machine's CPU cap in CPUs (`--cpu-limit 0.5`: half a core), kept in thousandths; above
/// zero, at most three decimals. Whether it fits the machine's vCPUs is checked at deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuLimit(u32);

impl CpuLimit {
    /// The cap in thousandths of a CPU.
    pub fn milli(self) -> u32 {
        self.0
    }

    /// A cap of `m` thousandths of a CPU (0: none).
    pub fn from_milli(m: u32) -> Option<CpuLimit> {
        (m > 0).then_some(CpuLimit(m))
    }
}

impl FromStr for CpuLimit {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            Invalid(format!(
                "cpu limit {s:?} is not a number of CPUs (allowed: above 0 with at most 3 decimals, up to the machine's vCPUs, like 0.5 or 1.25)"
            ))
        };
        let t = s.trim();
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        let digits = |x: &str| x.chars().all(|c| c.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 3 {
            return Err(bad());
        }
        let w: u32 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let f: u32 = format!("{frac:0<3}").parse().map_err(|_| bad())?;
        let m = w
            .checked_mul(1000)
            .and_then(|m| m.checked_add(f))
            .ok_or_else(bad)?;
        CpuLimit::from_milli(m).ok_or_else(bad)
    }
}

impl fmt::Display for CpuLimit {
    /// Like `0.5`, `1` or `1.25`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, m) = (self.0 / 1000, self.0 % 1000);
        if m == 0 {
            write!(f, "{w}")
        } else {
            write!(f, "{w}.{}", format!("{m:03}").trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests;
