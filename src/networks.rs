//! Networks: [`Networks`] owns their rows and bridges. The default network follows the
//! configuration; others are created with a subnet that overlaps no network and no host route.

use crate::domain::{IfName, NetworkName, Subnet};
use crate::error::{Error, Result};
use crate::net::firewall::Firewall;
use crate::net::ipam;
use crate::net::link::HostLinks;
use crate::store::{Network, SharedStore};
use std::sync::Arc;

/// The network service.
pub struct Networks {
    store: Arc<SharedStore>,
    links: Arc<dyn HostLinks>,
    fw: Arc<Firewall>,
}

impl Networks {
    /// The service.
    pub fn new(store: Arc<SharedStore>, links: Arc<dyn HostLinks>, fw: Arc<Firewall>) -> Networks {
        Networks { store, links, fw }
    }

    /// Make the store's default network match the configuration (refused, naming them, when
    /// machines would not fit a new subnet), then bring every network's bridge up.
    pub async fn ensure(&self, bridge: &IfName, subnet: Subnet) -> Result<()> {
        let default = NetworkName::default_network();
        {
            let st = self.store.lock();
            match st.network(default.as_str()) {
                Ok(n) if n.subnet == subnet && n.bridge == *bridge => {}
                Ok(n) if n.bridge != *bridge => {
                    // Machines' links are ports of the old bridge: they cannot move.
                    let users = st.machines_on(&default)?;
                    if let Some(m) = users.first() {
                        return Err(Error::Conflict(format!(
                            "bridge {} of the default network cannot become {bridge} while machines use it ({} and {} more); delete them first or keep the old bridge",
                            n.bridge,
                            m.name,
                            users.len() - 1
                        )));
                    }
                    st.set_network_subnet(&default, bridge, subnet)?;
                    // The old bridge leaves sistemo's firewall: nothing guards it any more.
                    if let Err(e) = crate::net::link::set_route_localnet(n.bridge.as_str(), false) {
                        tracing::debug!(error = %e, "old bridge without route_localnet");
                    }
                }
                Ok(_) => st.set_network_subnet(&default, bridge, subnet)?,
                Err(_) => st.create_network(&Network {
                    name: default,
                    bridge: bridge.clone(),
                    subnet,
                })?,
            }
        }
        let networks = self.store.lock().networks()?;
        for n in &networks {
            self.links
                .ensure_bridge(n.bridge.as_str(), n.subnet.net(), n.gateway())
                .await?;
        }
        Ok(())
    }

    /// Every network with the number of machines on it.
    pub fn list(&self) -> Result<Vec<(Network, usize)>> {
        let st = self.store.lock();
        let ms = st.machines()?;
        Ok(st
            .networks()?
            .into_iter()
            .map(|n| {
                let count = ms.iter().filter(|m| m.network == n.name).count();
                (n, count)
            })
            .collect())
    }

    /// Create a network with its own bridge, on `subnet` or the next free `10.X.0.0/24`.
    pub async fn create(&self, name: &str, subnet: Option<&str>) -> Result<Network> {
        let name: NetworkName = name.parse()?;
        let subnet = subnet.map(|s| Subnet::parse("subnet", s)).transpose()?;
        let existing = self.store.lock().networks()?;
        if existing.iter().any(|n| n.name == name) {
            return Err(Error::Conflict(format!(
                "network {:?} already exists",
                name.as_str()
            )));
        }
        let routes = self.links.routed_v4().await?;
        let taken: Vec<_> = existing.iter().map(|n| (n.name.clone(), n.subnet)).collect();
        let subnet = match subnet {
            Some(s) => match ipam::overlap(s, &taken, &routes) {
                Some(o) => {
                    return Err(Error::Conflict(format!(
                        "subnet {s} overlaps {o}; choose a subnet that does not"
                    )));
                }
                None => s,
            },
            None => ipam::choose(&taken, &routes)
                .ok_or_else(|| Error::Conflict("no free 10.x.0.0/24 subnet left; pass --subnet".into()))?,
        };
        let net = Network {
            bridge: name.bridge(),
            name,
            subnet,
        };
        if self.links.exists(net.bridge.as_str()).await? {
            return Err(Error::Conflict(format!(
                "a link named {} already exists on this host and sistemo does not own it",
                net.bridge
            )));
        }
        self.store.lock().create_network(&net)?;
        let r = async {
            self.links
                .ensure_bridge(net.bridge.as_str(), net.subnet.net(), net.gateway())
                .await?;
            self.rebuild_firewall().await
        }
        .await;
        if let Err(e) = r {
            let _ = self.links.delete(net.bridge.as_str()).await;
            let _ = self.store.lock().delete_network(net.name.as_str());
            let _ = self.rebuild_firewall().await;
            return Err(e);
        }
        Ok(net)
    }

    /// Delete a network; refused while machines use it, and for the default network.
    pub async fn delete(&self, name: &str) -> Result<()> {
        if name == NetworkName::default_network().as_str() {
            return Err(Error::Invalid("the default network cannot be deleted".into()));
        }
        let n = self.store.lock().network(name)?;
        self.store.lock().delete_network(name)?;
        self.rebuild_firewall().await?;
        self.links.delete(n.bridge.as_str()).await?;
        Ok(())
    }

    /// sistemo's bridges and whether each exists.
    pub async fn bridges(&self) -> Result<Vec<(String, bool)>> {
        let nets = self.store.lock().networks()?;
        let mut out = vec![];
        for n in nets {
            let ok = self.links.exists(n.bridge.as_str()).await.unwrap_or(false);
            out.push((n.bridge.to_string(), ok));
        }
        Ok(out)
    }

    /// Rebuild the firewall from the store (its bridges changed), on the blocking pool.
    async fn rebuild_firewall(&self) -> Result<()> {
        let fw = self.fw.clone();
        Ok(tokio::task::spawn_blocking(move || fw.rebuild())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?)
    }
}
