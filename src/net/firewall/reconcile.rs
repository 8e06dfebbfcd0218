//! [`Firewall`]: owns the driver and the lock that serialises changes to the kernel's table,
//! applies exposes of one machine, and restores the whole table when it drifted.

use super::{BridgeNet, Desired, FirewallDriver, FirewallError, Health, PortMapping};
use crate::spec::ExposeSpec;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

/// The firewall as the services see it. Every change goes through one lock, so a rebuild never
/// interleaves with an element change; health checks read without it.
pub struct Firewall {
    driver: Box<dyn FirewallDriver>,
    lock: Mutex<()>,
    forward_compat: bool,
}

impl Firewall {
    /// A firewall over `driver`; `forward_compat` patches foreign `policy drop` forward chains.
    pub fn new(driver: Box<dyn FirewallDriver>, forward_compat: bool) -> Firewall {
        Firewall {
            driver,
            lock: Mutex::new(()),
            forward_compat,
        }
    }

    fn locked(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forward `specs` of the machine at `ip` (one transaction).
    pub fn add(&self, ip: Ipv4Addr, specs: &[ExposeSpec]) -> Result<(), FirewallError> {
        let m = PortMapping::expand(specs.iter().map(|s| (ip, s)));
        let _g = self.locked();
        self.driver.add(&m)
    }

    /// Stop forwarding `specs` of the machine at `ip` (one transaction).
    pub fn remove(&self, ip: Ipv4Addr, specs: &[ExposeSpec]) -> Result<(), FirewallError> {
        let m = PortMapping::expand(specs.iter().map(|s| (ip, s)));
        let _g = self.locked();
        self.driver.remove(&m)
    }

    /// Replace the whole table with `desired` in one transaction, then patch foreign chains.
    pub fn rebuild(&self, desired: &Desired) -> Result<(), FirewallError> {
        let _g = self.locked();
        self.driver.rebuild(desired)?;
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
    /// from `desired()`. `deep` also verifies the rules. Returns whether it repaired.
    pub fn repair_once<E: From<FirewallError>>(
        &self,
        deep: bool,
        desired: impl Fn() -> Result<Desired, E>,
    ) -> Result<bool, E> {
        // Checked without the lock: exposes are never delayed by a check; a rebuild takes it.
        match self.driver.check(deep)? {
            Health::Drifted(why) => {
                tracing::warn!(reason = %why, "nftables drifted from the database; restoring");
                self.rebuild(&desired()?)?;
                tracing::info!("nftables restored from the database");
                Ok(true)
            }
            Health::InSync => {
                if self.forward_compat {
                    let bridges = desired()?.bridges;
                    let _g = self.locked();
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

    /// The table `desired` renders to, as text.
    pub fn render(&self, desired: &Desired) -> String {
        self.driver.render(desired)
    }
}
