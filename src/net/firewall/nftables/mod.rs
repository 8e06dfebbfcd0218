//! nftables backend: one table owned by sistemo, exposes held in verdict-free DNAT maps so a
//! packet lookup is O(1) and expose/unexpose is one element change. Loads on nft 1.0.6.
//!
//! Layout (family `ip`), by numeric priority so old nft versions accept it:
//! - `guard` (prerouting, [`PRIO_RAW`]): drops 127.0.0.0/8 arriving on sistemo's bridges, so
//!   `route_localnet` on a bridge never exposes host services bound to loopback (CVE-2020-8558).
//! - `prerouting` (prerouting, [`PRIO_DSTNAT`]) and `output` (output, [`PRIO_DSTNAT`]): DNAT only
//!   when the destination is an address of this host (`fib daddr type local`), first through the
//!   bound map (address, protocol, port), then the wildcard map (protocol, port).
//! - `postrouting` ([`PRIO_SRCNAT`]): masquerade loopback-sourced DNAT traffic, hairpin traffic
//!   (machine → host port → machine), and machines' egress (by source subnet: postrouting has no
//!   input interface). External clients keep their source.
//! - `forward` ([`PRIO_FILTER`]): isolation between sistemo networks; DNATed traffic passes.
//!
//! A foreign forward chain with `policy drop` (Docker's iptables-nft `filter FORWARD`) would
//! still drop exposed traffic: a drop in any base chain is final. For that case only,
//! [`FirewallDriver::ensure_forward_compat`] inserts three accept rules, tagged with a comment
//! naming this table, at the top of that chain (Docker documents its DOCKER-USER/FORWARD chains
//! for exactly this) and removes only its own rules later. Nothing else outside the table is touched.
//!
//! Changes are written as nft scripts or netlink batches; what the kernel holds is read back with
//! `nft -j` and parsed with the `nftables` crate's typed schema (`NfListObject`). Each object
//! of an answer is parsed on its own and one the schema cannot read is skipped (see `json::listing`):
//! foreign tables hold whatever other tools wrote (iptables-nft's `xt` matches, expressions newer
//! than the crate), and none of it may fail sistemo's health check or hide sistemo's own objects.
//! Only chains and rules are read back that way; the crate (0.6) cannot read nft 1.0.6's maps
//! with a concatenated data type (printed as one string), and map elements are read over
//! netlink instead.

mod json;
mod rules;
mod sets;

use super::{
    BridgeNet, Desired, FirewallDriver, FirewallError, Health, Held, MachinePort, Policy, PortMapping,
    netlink,
};
use json::{ForeignChain, chain_names, dnat_rules, foreign_drop_forward, rule_counts, tagged};
use sistemo_vmm::format_mac;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Priority of the guard chain (raw: before conntrack).
pub const PRIO_RAW: i32 = -300;
/// Priority of the DNAT chains (`dstnat`).
pub const PRIO_DSTNAT: i32 = -100;
/// Priority of the SNAT chain (`srcnat`).
pub const PRIO_SRCNAT: i32 = 100;
/// Priority of the forward filter chain (`filter`).
pub const PRIO_FILTER: i32 = 0;
/// Map of wildcard exposes: `proto . port : machine_ip . machine_port`.
pub const MAP_ANY: &str = "expose_any";
/// Map of bound exposes: `host_ip . proto . port : machine_ip . machine_port`.
pub const MAP_BOUND: &str = "expose_bound";
/// Set of sistemo's bridges.
pub const SET_BRIDGES: &str = "bridges";
/// Set of sistemo's subnets (postrouting has no input interface, so sources are matched by subnet).
pub const SET_SUBNETS: &str = "subnets";
/// Set of host ports machines may reach.
const SET_HOST_PORTS: &str = "host_ports";
/// The base chains of the table.
pub const CHAINS: [&str; 6] = ["guard", "prerouting", "output", "postrouting", "forward", "input"];
/// The bridge-family table's sets: machine ports, and the MAC and the IP each may send from.
const SET_PORTS: &str = "ports";
const SET_PORT_MAC: &str = "port_mac";
const SET_PORT_IP: &str = "port_ip";
/// The bridge-family table's base chain (prerouting on sistemo's bridges' ports).
pub const BRIDGE_CHAIN: &str = "ports";
/// Priority of the port filter: before anything else on the bridge.
pub const PRIO_BRIDGE: i32 = -300;
/// The nftables family of the table.
pub const FAMILY: &str = "ip";

/// `Nftables::seen` before the driver has seen any generation.
const UNSEEN: u64 = u64::MAX;

/// The nftables driver for one table name (an `ip` table for NAT and filtering, and a
/// `bridge` table of the same name for the machine ports' anti-spoofing).
#[derive(Debug, Clone)]
pub struct Nftables {
    table: String,
    policy: Policy,
    nft: String,
    /// The ruleset generation after the driver's last own commit or checked state (see
    /// [`FirewallDriver::changed`]); [`UNSEEN`] before the first.
    seen: Arc<AtomicU64>,
    /// Rules per chain of the table as last built, for the deep check.
    expected_rules: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Nftables {
    /// A driver for table `table` applying `policy`, running the `nft` found on PATH.
    pub fn new(table: impl Into<String>, policy: Policy) -> Self {
        Nftables {
            table: table.into(),
            policy,
            nft: "nft".into(),
            seen: Arc::new(AtomicU64::new(UNSEEN)),
            expected_rules: Arc::default(),
        }
    }

    /// Run `commit` (one transaction of the driver's own) and keep the ruleset generation it
    /// produced as seen, so the repair loop does not inspect the driver's own changes. Only a
    /// generation exactly one past the one before counts (nothing else committed in between);
    /// for an element change the generation before must also be the seen one (else a foreign
    /// change before it is still unchecked). A `whole_table` rebuild replaces everything of
    /// ours, so an earlier foreign change needs no check of its own.
    fn committed<T>(
        &self,
        whole_table: bool,
        commit: impl FnOnce() -> Result<T, FirewallError>,
    ) -> Result<T, FirewallError> {
        let before = netlink::generation().ok();
        let r = commit()?;
        if let (Some(before), Ok(after)) = (before, netlink::generation())
            && after == before.wrapping_add(1)
            && (whole_table || self.seen.load(Ordering::SeqCst) == u64::from(before))
        {
            self.seen.store(u64::from(after), Ordering::SeqCst);
        }
        Ok(r)
    }

    /// The comment tagging rules this daemon puts in foreign chains.
    fn tag(&self) -> String {
        format!("sistemo:{}", self.table)
    }

    /// Run one nft script as a single transaction.
    fn apply(&self, script: &str) -> Result<(), FirewallError> {
        let mut child = Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => FirewallError::NftMissing,
                _ => FirewallError::Io(e),
            })?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let first = err.lines().find(|l| l.contains("Error")).unwrap_or(err.trim());
            return Err(FirewallError::Rejected(first.trim().to_string()));
        }
        Ok(())
    }

    fn query(&self, args: &[&str]) -> Result<Option<String>, FirewallError> {
        let out = Command::new(&self.nft)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => FirewallError::NftMissing,
                _ => FirewallError::Io(e),
            })?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// Element changes go straight over netlink (one batch, no process, no cache fetch);
    /// if that fails for any reason other than the kernel's verdict, `nft` does it.
    fn change(&self, op: netlink::Op, mappings: &[PortMapping]) -> Result<(), FirewallError> {
        if mappings.is_empty() {
            return Ok(());
        }
        let (bound, any): (Vec<&PortMapping>, Vec<&PortMapping>) =
            mappings.iter().partition(|m| m.bind.is_some());
        match netlink::apply(&self.table, op, &[(MAP_ANY, any), (MAP_BOUND, bound)]) {
            Ok(()) => Ok(()),
            Err(e @ FirewallError::Rejected(_)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "netlink element change failed; falling back to nft");
                let mut s = String::new();
                self.elements(
                    &mut s,
                    if op == netlink::Op::Add { "add" } else { "delete" },
                    mappings,
                );
                self.apply(&s)
            }
        }
    }

    /// The shallow check, from `nft -j list chains ip`: the table and all its chains are there.
    fn chains_health(&self, json: &str) -> Health {
        let ours = chain_names(json, &self.table);
        if ours.is_empty() {
            return Health::Drifted(format!("table {FAMILY} {} is missing", self.table));
        }
        match CHAINS.iter().find(|c| !ours.iter().any(|o| o == *c)) {
            Some(c) => Health::Drifted(format!("chain {c} of table {FAMILY} {} is missing", self.table)),
            None => Health::InSync,
        }
    }

    /// The deep check, from `nft -j list chain ip <table> prerouting`: both DNAT rules are there.
    fn rules_health(&self, json: &str) -> Health {
        if dnat_rules(json, &self.table, "prerouting") < 2 {
            return Health::Drifted(format!("rules of table {FAMILY} {} were flushed", self.table));
        }
        Health::InSync
    }

    /// The deep check, from `nft -j list table ip <table>` and `… bridge <table>`: every chain
    /// holds as many rules as the last rebuild put there (a flushed `guard` or bridge `ports`
    /// chain, a deleted rule), and prerouting at least the two DNAT rules.
    fn table_rules_health(&self, listings: &[String]) -> Health {
        let mut held = BTreeMap::new();
        for json in listings {
            held.extend(rule_counts(json, &self.table));
        }
        let expected = self
            .expected_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (chain, want) in &expected {
            let have = held.get(chain).copied().unwrap_or(0);
            if have != *want {
                let (family, name) = chain.split_once(' ').unwrap_or((FAMILY, chain));
                return Health::Drifted(format!(
                    "chain {name} of table {family} {} holds {have} rules, not {want}",
                    self.table
                ));
            }
        }
        listings
            .first()
            .map_or(Health::InSync, |ip| self.rules_health(ip))
    }

    /// Forward base chains of other tables whose policy is drop.
    fn foreign_drop_forward_chains(&self) -> Result<Vec<ForeignChain>, FirewallError> {
        let Some(out) = self.query(&["-j", "list", "chains"])? else {
            return Ok(vec![]);
        };
        Ok(foreign_drop_forward(&out, &self.table))
    }

    /// Handles and comments of our tagged rules in a foreign chain.
    fn tagged_rules(&self, c: &ForeignChain) -> Result<Vec<(u32, String)>, FirewallError> {
        let Some(out) = self.query(&["-j", "-a", "list", "chain", c.family, &c.table, &c.name])? else {
            return Ok(vec![]);
        };
        Ok(tagged(&out, &self.tag()))
    }
}

impl FirewallDriver for Nftables {
    fn rebuild(&self, desired: &Desired) -> Result<(), FirewallError> {
        let text = self.table_text(desired) + &self.bridge_table_text();
        self.committed(true, || self.apply(&self.rebuild_script(desired)))?;
        *self.expected_rules.lock().unwrap_or_else(|p| p.into_inner()) = expected_rule_counts(&text);
        Ok(())
    }

    fn add(&self, mappings: &[PortMapping]) -> Result<(), FirewallError> {
        self.committed(false, || self.change(netlink::Op::Add, mappings))
    }

    fn remove(&self, mappings: &[PortMapping]) -> Result<(), FirewallError> {
        self.committed(false, || self.change(netlink::Op::Delete, mappings))
    }

    fn bind(&self, ports: &[MachinePort]) -> Result<(), FirewallError> {
        let mut s = String::new();
        self.port_elements(&mut s, "add", ports);
        self.committed(false, || self.apply(&s))
    }

    fn unbind(&self, ports: &[MachinePort]) -> Result<(), FirewallError> {
        let mut s = String::new();
        self.port_elements(&mut s, "delete", ports);
        self.committed(false, || self.apply(&s))
    }

    fn check(&self, deep: bool) -> Result<Health, FirewallError> {
        // `list chains` does not fetch map elements: a few ms even with 10,000 exposes.
        let Some(out) = self.query(&["-j", "list", "chains", FAMILY])? else {
            return Ok(Health::Drifted("nft list chains failed".into()));
        };
        let shallow = self.chains_health(&out);
        if !deep || shallow != Health::InSync {
            return Ok(shallow);
        }
        // Listing rules makes nft fetch every map element (about 50 ms at 10,000 exposes), so
        // the repair loop asks for it only when the ruleset generation moved.
        let mut listings = vec![];
        for family in [FAMILY, "bridge"] {
            match self.query(&["-j", "-t", "list", "table", family, &self.table])? {
                None => {
                    return Ok(Health::Drifted(format!(
                        "table {family} {} is missing",
                        self.table
                    )));
                }
                Some(json) => listings.push(json),
            }
        }
        Ok(self.table_rules_health(&listings))
    }

    fn changed(&self) -> Result<Option<u64>, FirewallError> {
        let now = u64::from(netlink::generation()?);
        Ok((self.seen.load(Ordering::SeqCst) != now).then_some(now))
    }

    fn settle(&self, generation: u64) {
        self.seen.store(generation, Ordering::SeqCst);
    }

    fn held(&self) -> Result<Option<Held>, FirewallError> {
        let mut held = Held::default();
        for map in [MAP_ANY, MAP_BOUND] {
            // A dump that raced a change is read again; a map that keeps changing is reported.
            let mut tries = 0;
            let els = loop {
                tries += 1;
                match netlink::elements(&self.table, map)? {
                    None => return Ok(None),
                    Some(e) if e.interrupted && tries < 3 => continue,
                    Some(e) if e.interrupted => {
                        return Err(FirewallError::Rejected(format!(
                            "map {map} kept changing while it was read"
                        )));
                    }
                    Some(e) => break e,
                }
            };
            held.mappings.extend(els.mappings);
            held.foreign += els.foreign;
        }
        Ok(Some(held))
    }

    fn ensure_forward_compat(&self, bridges: &[BridgeNet]) -> Result<Vec<String>, FirewallError> {
        let list = Self::bridge_list(bridges);
        let tag = format!(
            "{} {}",
            self.tag(),
            bridges
                .iter()
                .map(|b| b.bridge.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut patched = vec![];
        for chain in self.foreign_drop_forward_chains()? {
            let ours = self.tagged_rules(&chain)?;
            if ours.len() == 3 && ours.iter().all(|(_, c)| *c == tag) {
                continue;
            }
            let mut s = String::new();
            for (h, _) in &ours {
                let _ = writeln!(s, "delete rule {chain} handle {h}");
            }
            if !bridges.is_empty() {
                for rule in [
                    format!("oifname {{ {list} }} ct status dnat accept"),
                    format!("oifname {{ {list} }} ct state established,related accept"),
                    format!("iifname {{ {list} }} oifname != {{ {list} }} accept"),
                ] {
                    let _ = writeln!(s, "insert rule {chain} {rule} comment \"{tag}\"");
                }
            }
            self.committed(false, || self.apply(&s))?;
            patched.push(chain.to_string());
        }
        Ok(patched)
    }

    fn remove_forward_compat(&self) -> Result<(), FirewallError> {
        for chain in self.foreign_drop_forward_chains()? {
            let mut s = String::new();
            for (h, _) in self.tagged_rules(&chain)? {
                let _ = writeln!(s, "delete rule {chain} handle {h}");
            }
            if !s.is_empty() {
                self.committed(false, || self.apply(&s))?;
            }
        }
        Ok(())
    }

    fn render(&self, desired: &Desired) -> String {
        self.table_text(desired) + &self.bridge_table_text()
    }

    fn sets_drift(&self, desired: &Desired) -> Result<Option<String>, FirewallError> {
        Nftables::sets_drift(self, desired)
    }

    fn set_route_localnet(&self, bridge: &str, on: bool) -> Result<(), FirewallError> {
        crate::net::link::set_route_localnet(bridge, on)
            .map_err(|e| FirewallError::Io(std::io::Error::other(e)))
    }
}

/// Rules per chain (`family chain`) of tables as [`Nftables::table_text`] and
/// [`Nftables::bridge_table_text`] write them: one rule a line inside each `chain NAME {`
/// block, after its `type … hook …` line.
fn expected_rule_counts(text: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut chain: Option<String> = None;
    let mut family = FAMILY;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            family = if rest.starts_with("bridge ") {
                "bridge"
            } else {
                FAMILY
            };
        } else if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix('{')) {
            let name = format!("{family} {}", name.trim());
            counts.insert(name.clone(), 0);
            chain = Some(name);
        } else if line == "}" {
            chain = None;
        } else if let Some(c) = &chain
            && !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("policy ")
            && !line.starts_with("comment ")
        {
            *counts.get_mut(c).expect("inserted at its header") += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests;
