//! [`Firewall`]: owns the driver and the lock that serialises changes to the kernel's tables,
//! applies one machine's exposes and port binding, and rebuilds from the database whenever an
//! element change fails or the kernel drifted.

use super::{BridgeNet, DesiredSource, FirewallDriver, FirewallError, Health, MachinePort, PortMapping};
use crate::spec::ExposeSpec;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

/// The firewall as the services see it. Every change goes through one lock, and a rebuild
/// reads the desired state under that lock, so a rebuild never brings back what a change made
/// after its snapshot removed. Health checks read without it.
pub struct Firewall {
    driver: Box<dyn FirewallDriver>,
    desired: DesiredSource,
    lock: Mutex<()>,
    forward_compat: bool,
}

impl Firewall {
    /// A firewall over `driver` that rebuilds from `desired`; `forward_compat` patches foreign
    /// `policy drop` forward chains.
    pub fn new(driver: Box<dyn FirewallDriver>, desired: DesiredSource, forward_compat: bool) -> Firewall {
        Firewall {
            driver,
            desired,
            lock: Mutex::new(()),
            forward_compat,
        }
    }

    fn locked(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply one element change; when the kernel refuses it (an element already gone, a table
    /// flushed meanwhile), rebuild everything from the database instead, which holds the change.
    fn change(
        &self,
        what: &str,
        f: impl FnOnce(&dyn FirewallDriver) -> Result<(), FirewallError>,
    ) -> Result<(), FirewallError> {
        let _g = self.locked();
        if let Err(e) = f(&*self.driver) {
            tracing::warn!(error = %crate::error::chain(&e), what, "element change failed; rebuilding from the database");
            self.rebuild_locked()?;
        }
        Ok(())
    }

    /// Forward `specs` of the machine at `ip` (one transaction).
    pub fn add(&self, ip: Ipv4Addr, specs: &[ExposeSpec]) -> Result<(), FirewallError> {
        let m = PortMapping::expand(specs.iter().map(|s| (ip, s)));
        self.change("adding exposes", |d| d.add(&m))
    }

    /// Stop forwarding `specs` of the machine at `ip` (one transaction).
    pub fn remove(&self, ip: Ipv4Addr, specs: &[ExposeSpec]) -> Result<(), FirewallError> {
        let m = PortMapping::expand(specs.iter().map(|s| (ip, s)));
        self.change("removing exposes", |d| d.remove(&m))
    }

    /// Bind a machine's port to its MAC and IP.
    pub fn bind(&self, port: &MachinePort) -> Result<(), FirewallError> {
        self.change("binding a machine port", |d| d.bind(std::slice::from_ref(port)))
    }

    /// Forget a machine's port binding.
    pub fn unbind(&self, port: &MachinePort) -> Result<(), FirewallError> {
        self.change("unbinding a machine port", |d| {
            d.unbind(std::slice::from_ref(port))
        })
    }

    /// Replace the whole table with the database's state in one transaction, then patch
    /// foreign chains.
    pub fn rebuild(&self) -> Result<(), FirewallError> {
        let _g = self.locked();
        self.rebuild_locked()
    }

    fn rebuild_locked(&self) -> Result<(), FirewallError> {
        let desired = (self.desired)().map_err(FirewallError::State)?;
        self.driver.rebuild(&desired)?;
        self.patch_foreign_chains(&desired.bridges)
    }

    fn patch_foreign_chains(&self, bridges: &[BridgeNet]) -> Result<(), FirewallError> {
        if self.forward_compat {
            for c in self.driver.ensure_forward_compat(bridges)? {
                tracing::info!(chain = %c, "foreign forward chain has policy drop: inserted sistemo's accept rules");
            }
        }
        Ok(())
    }

    /// One self-repair pass: when the table drifted (a flush, a firewall reload), rebuild it
    /// from the database. `deep` also verifies the rules. Returns whether it repaired.
    pub fn repair_once(&self, deep: bool) -> Result<bool, FirewallError> {
        // Checked without the lock: exposes are never delayed by a check; a rebuild takes it.
        match self.driver.check(deep)? {
            Health::Drifted(why) => {
                tracing::warn!(reason = %why, "nftables drifted from the database; restoring");
                let _g = self.locked();
                let desired = (self.desired)().map_err(FirewallError::State)?;
                // Without the guard, route_localnet would expose the host's loopback services
                // to machines: off until the tables are back.
                let localnet = |on| {
                    for b in &desired.bridges {
                        if let Err(e) = crate::net::link::set_route_localnet(&b.bridge, on) {
                            tracing::warn!(bridge = %b.bridge, error = %crate::error::chain(&e), "setting route_localnet failed");
                        }
                    }
                };
                localnet(false);
                self.driver.rebuild(&desired)?;
                self.patch_foreign_chains(&desired.bridges)?;
                localnet(true);
                tracing::info!("nftables restored from the database");
                Ok(true)
            }
            Health::InSync => {
                if self.forward_compat {
                    let _g = self.locked();
                    let bridges = (self.desired)().map_err(FirewallError::State)?.bridges;
                    self.patch_foreign_chains(&bridges)?;
                }
                Ok(false)
            }
        }
    }

    /// Health as one line: `in sync`, or what drifted, or why it could not be checked.
    pub fn health(&self) -> String {
        match self.driver.check(true) {
            Ok(Health::InSync) => "in sync".into(),
            Ok(Health::Drifted(w)) => w,
            Err(e) => e.to_string(),
        }
    }

    /// The tables as they should be, as text.
    pub fn render(&self) -> Result<String, FirewallError> {
        let desired = (self.desired)().map_err(FirewallError::State)?;
        Ok(self.driver.render(&desired))
    }

    /// Remove sistemo's rules from foreign chains (clean daemon stop): exposes stay in
    /// sistemo's own table, but nothing of sistemo is left in other tools' chains.
    pub fn remove_forward_compat(&self) {
        let _g = self.locked();
        if let Err(e) = self.driver.remove_forward_compat() {
            tracing::warn!(error = %crate::error::chain(&e), "removing sistemo's rules from foreign chains failed");
        }
    }
}
