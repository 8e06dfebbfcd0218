//! A machine's exposed ports: claims in the store first (all or none), then the firewall when
//! the machine runs; checks against host listeners; and the firewall's whole desired state.

use super::{MachineView, Machines};
use crate::domain::{MachineName, MachineState};
use crate::error::{Error, Result};
use crate::net::firewall::{BridgeNet, Desired, MachinePort, PortMapping};
use crate::spec::{ExposeSpec, HostPortSpec, Protocol, check_no_duplicates};
use crate::store::Store;
use std::net::Ipv4Addr;

impl Machines {
    /// Expose ports (all or none). On a stopped machine only the rows change.
    pub async fn expose(&self, name: &str, specs: &[ExposeSpec]) -> Result<MachineView> {
        if specs.is_empty() {
            return Err(Error::Invalid(
                "no --port given (allowed: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp])".into(),
            ));
        }
        let id = self.store.lock().machine(name)?.id;
        self.precheck_exposes(specs)?;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        // Read again under the lock: a delete may have won the race.
        let m = self.store.lock().machine_by_id(id)?;
        self.store.lock().add_exposes(id, specs)?;
        if m.state == MachineState::Running
            && let Err(e) = {
                let (ip, specs) = (m.ip, specs.to_vec());
                self.firewall(move |fw| fw.add(ip, &specs)).await
            }
        {
            let mut st = self.store.lock();
            for s in specs {
                let _ = st.remove_exposes(id, &s.host);
            }
            return Err(e.into());
        }
        self.get(&id.to_string())
    }

    /// Remove exposes by their host side (`8080` = tcp 8080; `8080/udp`; `127.0.0.1:8080`).
    pub async fn unexpose(&self, name: &str, h: &HostPortSpec) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let m = self.store.lock().machine_by_id(id)?;
        let removed = self.store.lock().remove_exposes(id, h)?;
        if removed.is_empty() {
            let have: Vec<String> = self
                .store
                .lock()
                .exposes_of(id)?
                .iter()
                .map(|e| e.host.to_string())
                .collect();
            return Err(Error::NotFound(format!(
                "port {h} is not exposed on machine {} (exposed: {})",
                m.name,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        if m.state == MachineState::Running {
            let (ip, gone) = (m.ip, removed.clone());
            self.firewall(move |fw| fw.remove(ip, &gone)).await?;
            crate::net::conntrack::forget_exposes(m.ip, &removed).await;
        }
        self.get(&id.to_string())
    }

    /// Every exposed port on the host with its machine and whether the machine runs.
    pub fn ports(&self) -> Result<Vec<(MachineName, MachineState, ExposeSpec)>> {
        Ok(self.store.lock().all_exposes()?)
    }

    /// Check exposes against each other, the API's port and host listeners (no state change).
    pub(super) fn precheck_exposes(&self, specs: &[ExposeSpec]) -> Result<()> {
        check_no_duplicates(specs).map_err(|e| Error::Invalid(e.to_string()))?;
        for s in specs {
            for p in s.host.ports.ports() {
                if self.settings.api_ports.contains(&p) && s.host.proto == Protocol::Tcp {
                    return Err(Error::Conflict(format!(
                        "host port {p}/tcp is the sistemo API's own TCP port; choose another host port"
                    )));
                }
                probe_host_port(s.host.bind, s.host.proto, p)?;
            }
        }
        Ok(())
    }
}

/// Whether a host process already serves `proto` on `bind:port` (bind probe; std sets
/// SO_REUSEADDR on TCP listeners, so only a live listener, not TIME_WAIT, makes this fail).
fn probe_host_port(bind: Option<Ipv4Addr>, proto: Protocol, port: u16) -> Result<()> {
    let addr = (bind.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
    let r = match proto {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::Conflict(format!(
            "host port {}{port}/{proto} is already in use by a process on this host; choose another host port",
            bind.map(|b| format!("{b}:")).unwrap_or_default()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Err(Error::Invalid(format!(
            "bind address {} is not an address of this host (allowed: an address of this host, or none for all)",
            addr.0
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Error::Invalid(format!(
            "host port {port} is privileged (below 1024): the daemon must run as root to expose it"
        ))),
        Err(_) => Ok(()),
    }
}

/// A machine's MAC: derived from its lease (from its ID for machines made before that).
pub fn machine_mac(m: &crate::store::Machine) -> [u8; 6] {
    if m.legacy_mac {
        crate::net::legacy_mac_for(&m.id)
    } else {
        crate::net::mac_for(m.network.as_str(), m.ip)
    }
}

/// A machine's port binding: its link on the bridge, its MAC and its leased address.
pub fn machine_port(m: &crate::store::Machine) -> MachinePort {
    MachinePort {
        ifname: crate::net::host_ifname(&m.id),
        mac: machine_mac(m),
        ip: m.ip,
    }
}

/// What the firewall must hold, from the store: every network's bridge, every machine's port
/// binding, and the exposes of running machines.
pub fn desired_firewall(st: &Store) -> Result<Desired> {
    let bridges = st
        .networks()?
        .into_iter()
        .map(|n| BridgeNet {
            bridge: n.bridge.to_string(),
            subnet: n.subnet.net(),
        })
        .collect();
    let active = st.active_exposes()?;
    Ok(Desired {
        bridges,
        ports: st.machines()?.iter().map(machine_port).collect(),
        mappings: PortMapping::expand(active.iter().map(|(ip, s)| (*ip, s))),
    })
}
