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
//! `nft -j` and parsed with the `nftables` crate's typed schema ([`NfListObject`]). Each object
//! of an answer is parsed on its own and one the schema cannot read is skipped (see [`listing`]):
//! foreign tables hold whatever other tools wrote (iptables-nft's `xt` matches, expressions newer
//! than the crate), and none of it may fail sistemo's health check or hide sistemo's own objects.

use super::{BridgeNet, Desired, FirewallDriver, FirewallError, Health, PortMapping, netlink};
use ::nftables::schema::{Chain, NfListObject, Rule};
use ::nftables::stmt::Statement;
use ::nftables::types::{NfChainPolicy, NfFamily, NfHook};
use serde::Deserialize as _;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

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
/// The base chains of the table.
pub const CHAINS: [&str; 5] = ["guard", "prerouting", "output", "postrouting", "forward"];
/// The nftables family of the table.
pub const FAMILY: &str = "ip";

/// The nftables driver for one table name.
#[derive(Debug, Clone)]
pub struct Nftables {
    table: String,
    nft: String,
}

impl Nftables {
    /// A driver for table `table`, running the `nft` found on PATH.
    pub fn new(table: impl Into<String>) -> Self {
        Nftables {
            table: table.into(),
            nft: "nft".into(),
        }
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

    fn elements(&self, out: &mut String, verb: &str, mappings: &[PortMapping]) {
        let (bound, any): (Vec<&PortMapping>, Vec<&PortMapping>) =
            mappings.iter().partition(|m| m.bind.is_some());
        let t = &self.table;
        let with_value = verb == "add";
        for (map, list) in [(MAP_ANY, any), (MAP_BOUND, bound)] {
            for chunk in list.chunks(4096) {
                let _ = write!(out, "{verb} element {FAMILY} {t} {map} {{ ");
                for (i, m) in chunk.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    if let Some(b) = m.bind {
                        let _ = write!(out, "{b} . ");
                    }
                    let _ = write!(out, "{} . {}", m.proto, m.host_port);
                    if with_value {
                        let _ = write!(out, " : {} . {}", m.ip, m.machine_port);
                    }
                }
                out.push_str(" }\n");
            }
        }
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

    fn bridge_list(bridges: &[BridgeNet]) -> String {
        bridges
            .iter()
            .map(|b| format!("\"{}\"", b.bridge))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The whole table definition (without elements of the maps).
    fn table_text(&self, desired: &Desired) -> String {
        let t = &self.table;
        let mut s = String::new();
        let _ = writeln!(s, "table {FAMILY} {t} {{");
        let _ = writeln!(s, "\tset {SET_BRIDGES} {{\n\t\ttype ifname");
        if !desired.bridges.is_empty() {
            let _ = writeln!(s, "\t\telements = {{ {} }}", Self::bridge_list(&desired.bridges));
        }
        s.push_str("\t}\n");
        let _ = writeln!(
            s,
            "\tset {SET_SUBNETS} {{\n\t\ttype ipv4_addr\n\t\tflags interval"
        );
        if !desired.bridges.is_empty() {
            let subnets: Vec<String> = desired.bridges.iter().map(|b| b.subnet.to_string()).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", subnets.join(", "));
        }
        s.push_str("\t}\n");
        let _ = writeln!(
            s,
            "\tmap {MAP_ANY} {{\n\t\ttype inet_proto . inet_service : ipv4_addr . inet_service\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tmap {MAP_BOUND} {{\n\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service\n\t}}"
        );
        let dnat = format!(
            "\t\tfib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @{MAP_BOUND}\n\
             \t\tfib daddr type local dnat ip to meta l4proto . th dport map @{MAP_ANY}\n"
        );
        let _ = writeln!(
            s,
            "\tchain guard {{\n\t\ttype filter hook prerouting priority {PRIO_RAW}; policy accept;\n\
             \t\tiifname @{SET_BRIDGES} ip daddr 127.0.0.0/8 drop\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain prerouting {{\n\t\ttype nat hook prerouting priority {PRIO_DSTNAT}; policy accept;\n{dnat}\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain output {{\n\t\ttype nat hook output priority {PRIO_DSTNAT}; policy accept;\n{dnat}\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority {PRIO_SRCNAT}; policy accept;\n\
             \t\toifname @{SET_BRIDGES} ip saddr 127.0.0.0/8 masquerade\n\
             \t\tip saddr @{SET_SUBNETS} oifname @{SET_BRIDGES} ct status dnat masquerade\n\
             \t\tip saddr @{SET_SUBNETS} oifname != @{SET_BRIDGES} masquerade\n\t}}"
        );
        let _ = writeln!(
            s,
            "\tchain forward {{\n\t\ttype filter hook forward priority {PRIO_FILTER}; policy accept;\n\
             \t\tct status dnat accept"
        );
        for b in &desired.bridges {
            let _ = writeln!(
                s,
                "\t\tiifname \"{}\" oifname @{SET_BRIDGES} oifname != \"{}\" drop",
                b.bridge, b.bridge
            );
        }
        s.push_str("\t}\n}\n");
        s
    }

    /// The atomic rebuild script: ensure, delete, define, fill.
    pub fn rebuild_script(&self, desired: &Desired) -> String {
        let t = &self.table;
        let mut s = format!("table {FAMILY} {t}\ndelete table {FAMILY} {t}\n");
        s.push_str(&self.table_text(desired));
        self.elements(&mut s, "add", &desired.mappings);
        s
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

/// A base chain of another table, as nft commands name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForeignChain {
    family: &'static str,
    table: String,
    name: String,
}

impl std::fmt::Display for ForeignChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.name)
    }
}

/// The family as nft's command line spells it.
fn family_name(f: NfFamily) -> &'static str {
    match f {
        NfFamily::IP => "ip",
        NfFamily::IP6 => "ip6",
        NfFamily::INet => "inet",
        NfFamily::ARP => "arp",
        NfFamily::Bridge => "bridge",
        NfFamily::NetDev => "netdev",
    }
}

/// The objects of an `nft -j list …` answer. Each is parsed on its own: one the schema cannot
/// read (in a foreign table) is skipped, so it neither fails the answer nor hides the others.
/// An answer that is not an nftables document at all yields nothing.
fn listing(json: &str) -> Vec<NfListObject<'static>> {
    #[derive(serde::Deserialize)]
    struct Document {
        nftables: Vec<serde_json::Value>,
    }
    let Ok(doc) = serde_json::from_str::<Document>(json) else {
        tracing::debug!("nft -j answer is not an nftables document");
        return vec![];
    };
    doc.nftables
        .into_iter()
        .filter_map(|v| match NfListObject::deserialize(v) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!(error = %e, "skipping an nft object the schema cannot read");
                None
            }
        })
        .collect()
}

/// The chains of an answer.
fn chains(json: &str) -> impl Iterator<Item = Chain<'static>> {
    listing(json).into_iter().filter_map(|o| match o {
        NfListObject::Chain(c) => Some(c),
        _ => None,
    })
}

/// The rules of an answer.
fn rules(json: &str) -> impl Iterator<Item = Rule<'static>> {
    listing(json).into_iter().filter_map(|o| match o {
        NfListObject::Rule(r) => Some(r),
        _ => None,
    })
}

/// From `nft -j list chains`: forward base chains with policy drop outside table `ip <ours>`.
fn foreign_drop_forward(json: &str, ours: &str) -> Vec<ForeignChain> {
    chains(json)
        .filter(|c| c.hook == Some(NfHook::Forward) && c.policy == Some(NfChainPolicy::Drop))
        .filter(|c| !(c.family == NfFamily::IP && c.table == ours))
        .map(|c| ForeignChain {
            family: family_name(c.family),
            table: c.table.into_owned(),
            name: c.name.into_owned(),
        })
        .collect()
}

/// From `nft -j -a list chain …`: handles and comments of the rules tagged `tag` (alone or
/// followed by a space and the bridges).
fn tagged(json: &str, tag: &str) -> Vec<(u32, String)> {
    rules(json)
        .filter_map(|r| {
            let c = r.comment?;
            let ours = c
                .strip_prefix(tag)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '));
            ours.then(|| (r.handle.unwrap_or(0), c.into_owned()))
        })
        .collect()
}

/// From `nft -j list chains ip`: the names of table `ip <table>`'s chains.
fn chain_names(json: &str, table: &str) -> Vec<String> {
    chains(json)
        .filter(|c| c.family == NfFamily::IP && c.table == table)
        .map(|c| c.name.into_owned())
        .collect()
}

/// From `nft -j list chain ip <table> <chain>`: how many of its rules DNAT.
fn dnat_rules(json: &str, table: &str, chain: &str) -> usize {
    rules(json)
        .filter(|r| r.family == NfFamily::IP && r.table == table && r.chain == chain)
        .filter(|r| r.expr.iter().any(|s| matches!(s, Statement::DNAT(_))))
        .count()
}

impl FirewallDriver for Nftables {
    fn rebuild(&self, desired: &Desired) -> Result<(), FirewallError> {
        self.apply(&self.rebuild_script(desired))
    }

    fn add(&self, mappings: &[PortMapping]) -> Result<(), FirewallError> {
        self.change(netlink::Op::Add, mappings)
    }

    fn remove(&self, mappings: &[PortMapping]) -> Result<(), FirewallError> {
        self.change(netlink::Op::Delete, mappings)
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
        // Listing rules makes nft fetch every map element (tens of ms at 10,000 exposes), so
        // rule flushes are checked on the slower deep cadence.
        Ok(
            match self.query(&["-j", "list", "chain", FAMILY, &self.table, "prerouting"])? {
                None => Health::Drifted(format!("table {FAMILY} {} is missing", self.table)),
                Some(json) => self.rules_health(&json),
            },
        )
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
                    format!("iifname {{ {list} }} accept"),
                ] {
                    let _ = writeln!(s, "insert rule {chain} {rule} comment \"{tag}\"");
                }
            }
            self.apply(&s)?;
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
                self.apply(&s)?;
            }
        }
        Ok(())
    }

    fn render(&self, desired: &Desired) -> String {
        self.table_text(desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;

    #[test]
    fn script_is_one_batch_with_numeric_priorities() {
        let nft = Nftables::new("t");
        let d = Desired {
            bridges: vec![BridgeNet {
                bridge: "sistemo0".into(),
                subnet: "10.200.0.0/16".parse().unwrap(),
            }],
            mappings: vec![
                PortMapping {
                    bind: None,
                    proto: Protocol::Tcp,
                    host_port: 80,
                    ip: "10.200.0.2".parse().unwrap(),
                    machine_port: 8080,
                },
                PortMapping {
                    bind: Some("127.0.0.1".parse().unwrap()),
                    proto: Protocol::Udp,
                    host_port: 53,
                    ip: "10.200.0.3".parse().unwrap(),
                    machine_port: 53,
                },
            ],
        };
        let s = nft.rebuild_script(&d);
        assert!(s.starts_with("table ip t\ndelete table ip t\n"));
        assert!(s.contains("priority -100;") && !s.contains("priority dstnat"));
        assert!(s.contains("add element ip t expose_any { tcp . 80 : 10.200.0.2 . 8080 }"));
        assert!(s.contains("add element ip t expose_bound { 127.0.0.1 . udp . 53 : 10.200.0.3 . 53 }"));
        assert!(s.contains("fib daddr type local dnat"));
    }

    /// Real `nft -j` output of nft 1.0.6 (Debian 12), captured in a network namespace: table
    /// `ip sistemo_fx` as the daemon builds it (two bridges, three exposes), iptables-nft's
    /// `ip filter FORWARD` with policy drop, `xt` matches (conntrack, physdev, comment, addrtype)
    /// and sistemo's three tagged compat rules, a native `inet other` table with a drop forward
    /// chain, and a netdev ingress chain.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/nft/",
                $name,
                ".json"
            ))
        };
    }

    const TABLE: &str = "sistemo_fx";

    /// `json` with `extra` objects appended and objects matching `drop` removed.
    fn edited(json: &str, extra: &[serde_json::Value], drop: impl Fn(&serde_json::Value) -> bool) -> String {
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        let list = v["nftables"].as_array_mut().unwrap();
        list.retain(|o| !drop(o));
        list.extend(extra.iter().cloned());
        v.to_string()
    }

    /// Objects no schema knows, as a foreign table or a newer nft could print them.
    fn unreadable() -> Vec<serde_json::Value> {
        serde_json::from_str(
            r#"[
                {"chain": {"family": "ip", "table": "x", "name": "c", "hook": "sideways", "policy": "drop"}},
                {"chain": {"family": "ip", "table": "x", "name": "c2", "hook": "forward", "policy": "maybe"}},
                {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 99,
                          "comment": "sistemo:sistemo_fx sistemo0", "expr": [{"frobnicate": {"x": 1}}]}},
                {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 98,
                          "expr": [{"secmark": "s"}, {"accept": null}]}},
                {"future_object": {"family": "ip", "table": "filter", "name": "n"}},
                "not an object",
                42
            ]"#,
        )
        .unwrap()
    }

    #[test]
    fn the_schema_reads_what_nft_prints_except_concatenated_map_data() {
        let mut unread = vec![];
        for (name, json) in [
            ("chains_all", fixture!("chains_all")),
            ("chains_ip", fixture!("chains_ip")),
            ("prerouting", fixture!("prerouting")),
            ("filter_forward", fixture!("filter_forward")),
            ("other_keep", fixture!("other_keep")),
            ("ruleset", fixture!("ruleset")),
        ] {
            let raw: serde_json::Value = serde_json::from_str(json).unwrap();
            let all = raw["nftables"].as_array().unwrap();
            let failed: Vec<&serde_json::Value> = all
                .iter()
                .filter(|o| NfListObject::deserialize(*o).is_err())
                .collect();
            assert_eq!(listing(json).len(), all.len() - failed.len(), "{name}");
            unread.extend(failed.into_iter().map(|o| format!("{name}: {o}")));
        }
        // Rules with comments, fib, dnat through a map, sets, counters, jumps and iptables-nft's
        // `xt` all parse. The crate (0.6.3) cannot read the two maps: nft 1.0.6 prints their
        // concatenated data type as one string, `"map": "ipv4_addr . inet_service"`. Sistemo never
        // reads maps back; they are skipped like any unreadable object.
        assert_eq!(unread.len(), 2, "{unread:#?}");
        for (u, map) in unread.iter().zip([MAP_ANY, MAP_BOUND]) {
            assert!(u.starts_with("ruleset: {\"map\":"), "{u}");
            assert!(u.contains(&format!("\"name\":\"{map}\"")), "{u}");
            assert!(u.contains(r#""map":"ipv4_addr . inet_service""#), "{u}");
        }
        let objects = listing(fixture!("ruleset"));
        assert!(
            objects
                .iter()
                .any(|o| matches!(o, NfListObject::Set(s) if s.name == SET_SUBNETS))
        );
        assert!(
            objects
                .iter()
                .any(|o| matches!(o, NfListObject::Set(s) if s.name == SET_BRIDGES))
        );
    }

    #[test]
    fn shallow_check_finds_the_table_among_foreign_ones() {
        let json = fixture!("chains_ip");
        assert_eq!(Nftables::new(TABLE).chains_health(json), Health::InSync);
        assert_eq!(
            Nftables::new("sistemo").chains_health(json),
            Health::Drifted("table ip sistemo is missing".into())
        );
        // A table of another family with the same name is not ours.
        let inet = edited(
            &fixture!("chains_all").replace(
                "\"family\": \"ip\", \"table\": \"sistemo_fx\"",
                "\"family\": \"inet\", \"table\": \"sistemo_fx\"",
            ),
            &[],
            |_| false,
        );
        assert!(matches!(
            Nftables::new(TABLE).chains_health(&inet),
            Health::Drifted(_)
        ));
        let no_forward = edited(json, &[], |o| {
            o["chain"]["table"] == TABLE && o["chain"]["name"] == "forward"
        });
        assert_eq!(
            Nftables::new(TABLE).chains_health(&no_forward),
            Health::Drifted("chain forward of table ip sistemo_fx is missing".into())
        );
        for garbage in ["", "not json", "{}", r#"{"nftables": 3}"#] {
            assert!(matches!(
                Nftables::new(TABLE).chains_health(garbage),
                Health::Drifted(_)
            ));
        }
    }

    #[test]
    fn deep_check_counts_the_dnat_rules() {
        let json = fixture!("prerouting");
        assert_eq!(dnat_rules(json, TABLE, "prerouting"), 2);
        assert_eq!(Nftables::new(TABLE).rules_health(json), Health::InSync);
        let flushed = edited(json, &[], |o| o.get("rule").is_some());
        assert_eq!(
            Nftables::new(TABLE).rules_health(&flushed),
            Health::Drifted("rules of table ip sistemo_fx were flushed".into())
        );
        // The same rules in the full ruleset, among the output chain's and foreign NAT rules.
        assert_eq!(dnat_rules(fixture!("ruleset"), TABLE, "prerouting"), 2);
        assert_eq!(dnat_rules(fixture!("ruleset"), TABLE, "output"), 2);
    }

    #[test]
    fn foreign_drop_forward_chains_are_found_in_any_family() {
        let found = foreign_drop_forward(fixture!("chains_all"), TABLE);
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["ip filter FORWARD", "inet other keep"]
        );
        // Our own forward chain is never patched, whatever its policy.
        let ours_drop = fixture!("chains_all").replace(
            r#""name": "forward", "handle": 5, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept""#,
            r#""name": "forward", "handle": 5, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop""#,
        );
        assert_ne!(ours_drop, fixture!("chains_all"));
        assert_eq!(foreign_drop_forward(&ours_drop, TABLE).len(), 2);
    }

    #[test]
    fn tagged_rules_are_ours_only() {
        let json = fixture!("filter_forward");
        let tag = Nftables::new(TABLE).tag();
        assert_eq!(
            tagged(json, &tag),
            [14, 12, 10].map(|h| (h, "sistemo:sistemo_fx sistemo0,sistemo1".to_string()))
        );
        // Another daemon's table whose name extends ours does not own them.
        assert!(tagged(json, "sistemo:sistemo_f").is_empty());
        assert!(tagged(json, "sistemo:other").is_empty());
    }

    #[test]
    fn unreadable_foreign_objects_are_skipped_not_fatal() {
        let chains = edited(fixture!("chains_all"), &unreadable(), |_| false);
        assert_eq!(Nftables::new(TABLE).chains_health(&chains), Health::InSync);
        assert_eq!(foreign_drop_forward(&chains, TABLE).len(), 2);
        let rules = edited(fixture!("filter_forward"), &unreadable(), |_| false);
        assert_eq!(tagged(&rules, &Nftables::new(TABLE).tag()).len(), 3);
        let pre = edited(fixture!("prerouting"), &unreadable(), |_| false);
        assert_eq!(Nftables::new(TABLE).rules_health(&pre), Health::InSync);
    }
}
