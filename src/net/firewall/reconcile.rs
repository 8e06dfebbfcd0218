//! [`Firewall`]: owns the driver and the lock that serialises changes to the kernel's tables,
//! applies one machine's exposes and port binding, and rebuilds from the database whenever an
//! element change fails or the kernel drifted.

use super::{
    BridgeNet, Desired, DesiredSource, FirewallDriver, FirewallError, Health, Held, MachinePort, PortMapping,
};
use crate::spec::ExposeSpec;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The firewall as the services see it. Every change goes through one lock, and a rebuild
/// reads the desired state under that lock, so a rebuild never brings back what a change made
/// after its snapshot removed. Health checks read without it.
pub struct Firewall {
    driver: Box<dyn FirewallDriver>,
    desired: DesiredSource,
    lock: Mutex<()>,
    forward_compat: bool,
    /// Set by [`Firewall::remove_forward_compat`] (clean stop): no pass after it puts rules
    /// back into foreign chains.
    stopping: AtomicBool,
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
            stopping: AtomicBool::new(false),
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
        self.rebuild_from(&desired, false)
    }

    /// Rebuild from `desired`. `route_localnet` is on on sistemo's bridges only while the
    /// guard dropping 127/8 from them is in place (CVE-2020-8558): turned on once the rebuild
    /// committed, turned off first when the guard may be gone (`guard_lost`), and left off
    /// when the rebuild fails.
    fn rebuild_from(&self, desired: &Desired, guard_lost: bool) -> Result<(), FirewallError> {
        let localnet = |on| {
            for b in &desired.bridges {
                if let Err(e) = self.driver.set_route_localnet(&b.bridge, on) {
                    tracing::warn!(bridge = %b.bridge, error = %crate::error::chain(&e), "setting route_localnet failed");
                }
            }
        };
        if guard_lost {
            localnet(false);
        }
        if let Err(e) = self.driver.rebuild(desired) {
            localnet(false);
            return Err(e);
        }
        localnet(true);
        self.patch_foreign_chains(&desired.bridges)
    }

    fn patch_foreign_chains(&self, bridges: &[BridgeNet]) -> Result<(), FirewallError> {
        if self.forward_compat && !self.stopping.load(Ordering::SeqCst) {
            for c in self.driver.ensure_forward_compat(bridges)? {
                tracing::info!(chain = %c, "foreign forward chain has policy drop: inserted sistemo's accept rules");
            }
        }
        Ok(())
    }

    /// One self-repair pass. Each pass reads the kernel's ruleset generation (one netlink
    /// round trip); when nothing was committed since the daemon's own last commit or check, that
    /// is all. Otherwise it checks the tables, their chains and their rules, then compares both
    /// maps' elements with the database (read under the lock, so no element change of the
    /// daemon is half-way), and rebuilds from the database on any difference. A change
    /// elsewhere in the ruleset costs one comparison and no rebuild. When the generation cannot
    /// be read, every pass checks the chains and `deep` passes do the rest. Returns whether it
    /// repaired.
    pub fn repair_once(&self, deep: bool) -> Result<bool, FirewallError> {
        // Read without the lock: exposes are never delayed by an idle check.
        let generation = match self.driver.changed() {
            Ok(None) => return Ok(false),
            Ok(Some(g)) => Some(g),
            Err(e) => {
                // Without a generation: the chains every pass, rules and elements when `deep`.
                tracing::debug!(error = %e, "reading the ruleset generation failed");
                None
            }
        };
        let full = generation.is_some() || deep;
        let health = self.driver.check(full)?;
        let _g = self.locked();
        let desired = (self.desired)().map_err(FirewallError::State)?;
        let drift = match health {
            Health::Drifted(why) => Some((why, true)),
            Health::InSync if full => match self.driver.held()? {
                // A dump racing the kernel's resize of a hash set (deferred, after a bulk
                // insert) can skip or repeat elements: a difference counts when a second read
                // shows it too.
                Some(held) => match mapping_drift(&held, &desired.mappings).and_then(|_| {
                    let again = self.driver.held().ok().flatten()?;
                    mapping_drift(&again, &desired.mappings)
                }) {
                    Some(why) => Some((why, false)),
                    // A set's element gone turns a guard off for a machine or a bridge (its
                    // anti-spoofing, its isolation): the sets are compared too.
                    // A bridge missing from `bridges` loses its guard: structural.
                    None => self.driver.sets_drift(&desired)?.map(|why| (why, true)),
                },
                None => None,
            },
            Health::InSync => None,
        };
        let Some((why, structural)) = drift else {
            self.patch_foreign_chains(&desired.bridges)?;
            if let Some(generation) = generation {
                self.driver.settle(generation);
            }
            return Ok(false);
        };
        tracing::warn!(reason = %why, "nftables drifted from the database; restoring");
        // Without the guard, route_localnet would expose the host's loopback services to
        // machines: off until the tables are back (only a structural drift can lose the guard).
        self.rebuild_from(&desired, structural)?;
        tracing::info!("nftables restored from the database");
        Ok(true)
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
    /// From then on no pass (the repair loop may still run) puts them back.
    pub fn remove_forward_compat(&self) {
        let _g = self.locked();
        self.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.driver.remove_forward_compat() {
            tracing::warn!(error = %crate::error::chain(&e), "removing sistemo's rules from foreign chains failed");
        }
    }
}

/// How the kernel's map elements differ from the mappings wanted, or None when they are equal
/// (added, missing and changed elements all count; a changed one is one of each).
pub fn mapping_drift(held: &Held, want: &[PortMapping]) -> Option<String> {
    let have: HashSet<&PortMapping> = held.mappings.iter().collect();
    let want: HashSet<&PortMapping> = want.iter().collect();
    let extra: Vec<&&PortMapping> = have.difference(&want).collect();
    let missing: Vec<&&PortMapping> = want.difference(&have).collect();
    if extra.is_empty() && missing.is_empty() && held.foreign == 0 && held.mappings.len() == have.len() {
        return None;
    }
    let show = |m: &PortMapping| {
        format!(
            "{}{}/{} -> {}:{}",
            m.bind.map(|b| format!("{b}:")).unwrap_or_default(),
            m.host_port,
            m.proto,
            m.ip,
            m.machine_port
        )
    };
    let mut why = vec![];
    if !extra.is_empty() {
        why.push(format!("{} unexpected (e.g. {})", extra.len(), show(extra[0])));
    }
    if !missing.is_empty() {
        why.push(format!("{} missing (e.g. {})", missing.len(), show(missing[0])));
    }
    if held.foreign > 0 {
        why.push(format!("{} of a foreign shape", held.foreign));
    }
    if why.is_empty() {
        why.push("duplicate elements".into());
    }
    Some(format!("map elements: {}", why.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;

    fn m(port: u16, ip: &str) -> PortMapping {
        PortMapping {
            bind: None,
            proto: Protocol::Tcp,
            host_port: port,
            ip: ip.parse().unwrap(),
            machine_port: 80,
        }
    }

    #[test]
    fn element_drift_added_missing_changed() {
        let want = vec![m(8080, "10.200.0.2"), m(8081, "10.200.0.3")];
        let same = Held {
            mappings: vec![m(8081, "10.200.0.3"), m(8080, "10.200.0.2")],
            foreign: 0,
        };
        assert_eq!(mapping_drift(&same, &want), None, "order does not matter");
        let added = Held {
            mappings: vec![
                m(8080, "10.200.0.2"),
                m(8081, "10.200.0.3"),
                m(9000, "10.200.0.9"),
            ],
            foreign: 0,
        };
        assert_eq!(
            mapping_drift(&added, &want).unwrap(),
            "map elements: 1 unexpected (e.g. 9000/tcp -> 10.200.0.9:80)"
        );
        let missing = Held {
            mappings: vec![m(8080, "10.200.0.2")],
            foreign: 0,
        };
        assert!(
            mapping_drift(&missing, &want)
                .unwrap()
                .contains("1 missing (e.g. 8081/tcp")
        );
        let changed = Held {
            mappings: vec![m(8080, "10.200.0.2"), m(8081, "10.200.0.66")],
            foreign: 0,
        };
        let why = mapping_drift(&changed, &want).unwrap();
        assert!(why.contains("1 unexpected") && why.contains("1 missing"), "{why}");
        let foreign = Held {
            mappings: want.clone(),
            foreign: 2,
        };
        assert!(
            mapping_drift(&foreign, &want)
                .unwrap()
                .contains("2 of a foreign shape")
        );
        assert_eq!(mapping_drift(&Held::default(), &[]), None);
    }

    /// Records what the firewall asks of it; its rebuild fails while `fail` is set.
    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
        fail: AtomicBool,
    }

    impl FirewallDriver for std::sync::Arc<Recorder> {
        fn rebuild(&self, _: &Desired) -> Result<(), FirewallError> {
            self.log.lock().unwrap().push("rebuild".into());
            if self.fail.load(Ordering::SeqCst) {
                return Err(FirewallError::Rejected("refused".into()));
            }
            Ok(())
        }
        fn add(&self, _: &[PortMapping]) -> Result<(), FirewallError> {
            Ok(())
        }
        fn remove(&self, _: &[PortMapping]) -> Result<(), FirewallError> {
            Ok(())
        }
        fn bind(&self, _: &[MachinePort]) -> Result<(), FirewallError> {
            Ok(())
        }
        fn unbind(&self, _: &[MachinePort]) -> Result<(), FirewallError> {
            Ok(())
        }
        fn check(&self, _: bool) -> Result<Health, FirewallError> {
            Ok(Health::Drifted("table missing".into()))
        }
        fn ensure_forward_compat(&self, _: &[BridgeNet]) -> Result<Vec<String>, FirewallError> {
            self.log.lock().unwrap().push("compat".into());
            Ok(vec![])
        }
        fn remove_forward_compat(&self) -> Result<(), FirewallError> {
            self.log.lock().unwrap().push("uncompat".into());
            Ok(())
        }
        fn render(&self, _: &Desired) -> String {
            String::new()
        }
        fn set_route_localnet(&self, bridge: &str, on: bool) -> Result<(), FirewallError> {
            self.log.lock().unwrap().push(format!("localnet {bridge} {on}"));
            Ok(())
        }
    }

    fn recorded() -> (Firewall, std::sync::Arc<Recorder>) {
        let rec = std::sync::Arc::new(Recorder::default());
        let desired = Desired {
            bridges: vec![BridgeNet {
                bridge: "br0".into(),
                subnet: "10.200.0.0/16".parse().unwrap(),
            }],
            ..Default::default()
        };
        let fw = Firewall::new(Box::new(rec.clone()), Box::new(move || Ok(desired.clone())), true);
        (fw, rec)
    }

    fn take(rec: &Recorder) -> Vec<String> {
        std::mem::take(&mut *rec.log.lock().unwrap())
    }

    #[test]
    fn route_localnet_only_after_the_guard_is_in_place() {
        let (fw, rec) = recorded();
        fw.rebuild().unwrap();
        assert_eq!(take(&rec), ["rebuild", "localnet br0 true", "compat"]);
        // a structural drift: off before the rebuild, on after it
        assert!(fw.repair_once(false).unwrap());
        assert_eq!(
            take(&rec),
            ["localnet br0 false", "rebuild", "localnet br0 true", "compat"]
        );
        // a failed rebuild leaves it off
        rec.fail.store(true, Ordering::SeqCst);
        assert!(fw.rebuild().is_err());
        assert_eq!(take(&rec), ["rebuild", "localnet br0 false"]);
        assert!(fw.repair_once(false).is_err());
        assert_eq!(
            take(&rec),
            ["localnet br0 false", "rebuild", "localnet br0 false"]
        );
    }

    #[test]
    fn no_compat_rules_after_stop() {
        let (fw, rec) = recorded();
        fw.rebuild().unwrap();
        fw.remove_forward_compat();
        take(&rec);
        // the repair loop still running after the stop rebuilds its own table, nothing more
        assert!(fw.repair_once(false).unwrap());
        fw.rebuild().unwrap();
        let log = take(&rec);
        assert!(!log.iter().any(|l| l == "compat"), "{log:?}");
        assert!(log.iter().any(|l| l == "rebuild"), "{log:?}");
    }

    /// The repair loop against a real kernel table, in a private network namespace.
    #[test]
    #[ignore = "needs root and network namespaces: run sudo scripts/test"]
    fn repair_loop_restores_elements_and_guard_and_ignores_foreign_tables() {
        use crate::net::firewall::netlink::tests::{in_private_netns, nft};
        use crate::net::firewall::nftables::Nftables;
        in_private_netns(|| {
            let desired = Desired {
                bridges: vec![BridgeNet {
                    bridge: "br0".into(),
                    subnet: "10.200.0.0/16".parse().unwrap(),
                }],
                ports: vec![MachinePort {
                    ifname: "smaaaa".into(),
                    mac: [0x52, 0x54, 1, 2, 3, 4],
                    ip: "10.200.0.2".parse().unwrap(),
                }],
                mappings: vec![m(8080, "10.200.0.2"), m(8081, "10.200.0.3")],
            };
            let d = desired.clone();
            let policy = crate::net::firewall::Policy {
                host_ports: vec![5432],
                ..Default::default()
            };
            let fw = Firewall::new(
                Box::new(Nftables::new("t", policy)),
                Box::new(move || Ok(d.clone())),
                false,
            );
            fw.rebuild().unwrap();
            assert_eq!(fw.driver.sets_drift(&desired).unwrap(), None, "sets as built");
            assert!(!fw.repair_once(false).unwrap(), "own rebuild is no drift");
            assert_eq!(fw.driver.changed().unwrap(), None, "own rebuild is seen");
            fw.add("10.200.0.4".parse().unwrap(), &[]).unwrap();
            // a foreign element: added, then a changed one, then a missing one
            for (script, what) in [
                (
                    "add element ip t expose_any { tcp . 9999 : 10.200.0.9 . 22 }",
                    "added",
                ),
                (
                    "delete element ip t expose_any { tcp . 8080 }\nadd element ip t expose_any { tcp . 8080 : 10.200.0.9 . 80 }",
                    "changed",
                ),
                ("delete element ip t expose_any { tcp . 8081 }", "missing"),
            ] {
                nft(script);
                assert!(fw.driver.changed().unwrap().is_some(), "{what}: generation moved");
                assert!(fw.repair_once(false).unwrap(), "{what}: repaired");
                let held = fw.driver.held().unwrap().unwrap();
                assert_eq!(mapping_drift(&held, &desired.mappings), None, "{what}: restored");
                assert_eq!(fw.driver.changed().unwrap(), None, "{what}: repair is seen");
            }
            // a set element deleted, or added, behind the daemon's back (anti-spoofing of a
            // machine port, the guards of a bridge, the host ports)
            for script in [
                "delete element bridge t ports { \"smaaaa\" }",
                "delete element bridge t port_mac { \"smaaaa\" . 52:54:01:02:03:04 }",
                "delete element bridge t port_ip { \"smaaaa\" . 10.200.0.2 }",
                "add element bridge t port_ip { \"smaaaa\" . 10.200.0.9 }",
                "delete element ip t bridges { \"br0\" }",
                "delete element ip t subnets { 10.200.0.0/16 }",
                "add element ip t subnets { 10.99.0.0/16 }",
                "delete element ip t host_ports { 5432 }",
                "add element ip t host_ports { 22 }",
            ] {
                nft(script);
                assert!(
                    fw.driver.sets_drift(&desired).unwrap().is_some(),
                    "{script}: drift seen"
                );
                assert!(fw.repair_once(false).unwrap(), "{script}: repaired");
                assert_eq!(
                    fw.driver.sets_drift(&desired).unwrap(),
                    None,
                    "{script}: restored"
                );
            }
            // a foreign table: one comparison, no repair, then quiet
            nft("table ip other { chain c { type filter hook input priority 0; policy accept; }; }");
            assert!(!fw.repair_once(false).unwrap());
            assert_eq!(fw.driver.changed().unwrap(), None);
            // a flushed guard chain, or the bridge table's port filter, is repaired
            for chain in ["ip t guard", "bridge t ports"] {
                nft(&format!("flush chain {chain}"));
                let name = chain.rsplit(' ').next().unwrap();
                assert!(matches!(fw.driver.check(true).unwrap(), Health::Drifted(w) if w.contains(name)));
                assert!(fw.repair_once(false).unwrap(), "{chain} repaired");
                assert_eq!(fw.driver.check(true).unwrap(), Health::InSync);
            }
            // element changes of the daemon itself leave the loop quiet
            let ip: std::net::Ipv4Addr = "10.200.0.5".parse().unwrap();
            let spec: ExposeSpec = "7000:70".parse().unwrap();
            fw.add(ip, std::slice::from_ref(&spec)).unwrap();
            assert_eq!(fw.driver.changed().unwrap(), None, "own add is seen");
            fw.remove(ip, std::slice::from_ref(&spec)).unwrap();
            assert_eq!(fw.driver.changed().unwrap(), None, "own remove is seen");
        });
    }
}
