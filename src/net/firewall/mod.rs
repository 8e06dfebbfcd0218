//! The firewall: the desired port-forwarding state as data, the driver trait that makes the
//! kernel hold it (one backend today, [`nftables`]), and [`Firewall`], its serialising owner.

pub mod netlink;
pub mod nftables;
mod reconcile;

pub use reconcile::{Firewall, mapping_drift};

use crate::spec::{ExposeSpec, Protocol};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// Errors of a firewall driver.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The `nft` program is missing.
    #[error("nft is not installed (apt-get install nftables)")]
    NftMissing,
    /// `nft` rejected a batch; nothing of it was applied.
    #[error("nftables rejected the change: {0}")]
    Rejected(String),
    /// Running `nft` failed.
    #[error("running nft: {0}")]
    Io(#[from] std::io::Error),
    /// The desired state could not be read (from the database).
    #[error("reading the desired firewall state")]
    State(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One host port forwarded to one machine port (ranges are expanded into these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// Bound host address, or every local address.
    pub bind: Option<Ipv4Addr>,
    /// `tcp` or `udp`.
    pub proto: Protocol,
    /// Host port.
    pub host_port: u16,
    /// Machine address.
    pub ip: Ipv4Addr,
    /// Machine port.
    pub machine_port: u16,
}

impl PortMapping {
    /// Expand exposes of running machines, each with its machine's address, into per-port
    /// mappings.
    pub fn expand<'a>(exposes: impl IntoIterator<Item = (Ipv4Addr, &'a ExposeSpec)>) -> Vec<PortMapping> {
        exposes
            .into_iter()
            .flat_map(|(ip, s)| {
                s.host.ports.ports().map(move |p| PortMapping {
                    bind: s.host.bind,
                    proto: s.host.proto,
                    host_port: p,
                    ip,
                    machine_port: s.machine_port_for(p),
                })
            })
            .collect()
    }
}

/// A bridge sistemo owns, with its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNet {
    /// Interface name.
    pub bridge: String,
    /// The network behind the bridge, for masquerading its egress.
    pub subnet: Ipv4Net,
}

/// A machine's port on its bridge and what it may send from: its MAC and its leased address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MachinePort {
    /// The host side of the machine's link (TAP or veth), a port of its bridge.
    pub ifname: String,
    /// The machine's MAC.
    pub mac: [u8; 6],
    /// The machine's address.
    pub ip: Ipv4Addr,
}

/// What machines may reach beyond their exposes' replies; fixed for a daemon's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Host ports machines may connect to on the host (through their gateway).
    pub host_ports: Vec<u16>,
    /// Whether machines may reach link-local addresses (cloud metadata, 169.254.0.0/16).
    pub allow_metadata: bool,
    /// Whether machines' new connections to SMTP ports (25, 465, 587) are dropped.
    pub block_smtp: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            host_ports: vec![],
            allow_metadata: false,
            block_smtp: true,
        }
    }
}

/// Everything the firewall must hold: sistemo's bridges, every machine's port binding and the
/// active port mappings.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Bridges (one per network).
    pub bridges: Vec<BridgeNet>,
    /// Ports of machines, with the only MAC and IP each may send from.
    pub ports: Vec<MachinePort>,
    /// Active mappings (exposes of running machines).
    pub mappings: Vec<PortMapping>,
}

/// Where the firewall reads the desired state from (the database), so that it can rebuild
/// under its own lock whenever an element change fails or the kernel drifted.
pub type DesiredSource =
    Box<dyn Fn() -> Result<Desired, Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The kernel holds sistemo's table as built.
    InSync,
    /// The table or part of it is gone (a flush, a firewall reload); the reason says what.
    Drifted(String),
}

/// What the kernel's maps hold, read back for the drift check.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Mappings in sistemo's shape.
    pub mappings: Vec<PortMapping>,
    /// Elements of another shape (nobody but a foreign tool puts them there).
    pub foreign: usize,
}

/// A firewall backend. Each call is one atomic transaction in the kernel.
pub trait FirewallDriver: Send + Sync {
    /// Replace sistemo's whole table with `desired`, atomically.
    fn rebuild(&self, desired: &Desired) -> Result<(), FirewallError>;
    /// Add mappings (one element change each, in one transaction).
    fn add(&self, mappings: &[PortMapping]) -> Result<(), FirewallError>;
    /// Remove mappings (one transaction).
    fn remove(&self, mappings: &[PortMapping]) -> Result<(), FirewallError>;
    /// Bind machine ports to their MAC and IP (anti-spoofing), in one transaction.
    fn bind(&self, ports: &[MachinePort]) -> Result<(), FirewallError>;
    /// Forget machine ports' bindings (one transaction).
    fn unbind(&self, ports: &[MachinePort]) -> Result<(), FirewallError>;
    /// Whether the kernel still holds the table. The shallow check (table and chains present)
    /// is cheap and runs on a short timer; `deep` also verifies the rules.
    fn check(&self, deep: bool) -> Result<Health, FirewallError>;
    /// Whether anything was committed to the kernel's ruleset since the driver's own last
    /// commit or the last [`FirewallDriver::settle`]: `Some(generation)` when something was
    /// (or the driver cannot tell), `None` when nothing was. One cheap kernel round trip.
    fn changed(&self) -> Result<Option<u64>, FirewallError> {
        Ok(Some(0))
    }
    /// Record that the ruleset as of `generation` (from [`FirewallDriver::changed`]) was checked.
    fn settle(&self, _generation: u64) {}
    /// The mappings the kernel's maps hold; `None` when the maps are missing (or the driver
    /// cannot read them).
    fn held(&self) -> Result<Option<Held>, FirewallError> {
        Ok(None)
    }
    /// How the kernel's sets (bridges, subnets, host ports, machine ports and their MAC and IP
    /// bindings) differ from `desired`; None when they are equal or cannot be read.
    fn sets_drift(&self, _desired: &Desired) -> Result<Option<String>, FirewallError> {
        Ok(None)
    }
    /// Keep exposed ports reachable when another table's forward chain drops by policy.
    /// Returns the chains it had to (re)patch, for the log.
    fn ensure_forward_compat(&self, bridges: &[BridgeNet]) -> Result<Vec<String>, FirewallError>;
    /// Remove whatever `ensure_forward_compat` added (daemon shutdown).
    fn remove_forward_compat(&self) -> Result<(), FirewallError>;
    /// Set `route_localnet` on `bridge` (only while the driver's tables guard 127/8 on it).
    fn set_route_localnet(&self, _bridge: &str, _on: bool) -> Result<(), FirewallError> {
        Ok(())
    }
    /// The tables as text (for `doctor` and the README).
    fn render(&self, desired: &Desired) -> String;
}
