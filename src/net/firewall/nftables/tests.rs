//! Tests of the nftables backend: the rebuild script, and reading real `nft -j` output of
//! nft 1.0.6 (fixtures captured in a namespace), foreign objects included.

use super::json::*;
use super::*;
use crate::spec::Protocol;
use ::nftables::schema::NfListObject;
use serde::Deserialize as _;

#[test]
fn script_is_one_batch_with_numeric_priorities() {
    let nft = Nftables::new("t", Policy::default());
    let d = Desired {
        bridges: vec![BridgeNet {
            bridge: "sistemo0".into(),
            subnet: "10.200.0.0/16".parse().unwrap(),
        }],
        ports: vec![MachinePort {
            ifname: "sm0123456789".into(),
            mac: [0x52, 0x54, 1, 2, 3, 4],
            ip: "10.200.0.2".parse().unwrap(),
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
    // both tables in the one transaction, the port bound before it is filtered
    assert!(s.contains("table bridge t\ndelete table bridge t\n"));
    let mac = s
        .find("add element bridge t port_mac { \"sm0123456789\" . 52:54:01:02:03:04 }")
        .unwrap();
    let ip = s
        .find("add element bridge t port_ip { \"sm0123456789\" . 10.200.0.2 }")
        .unwrap();
    let port = s.find("add element bridge t ports { \"sm0123456789\" }").unwrap();
    assert!(mac < port && ip < port, "{s}");
    // the default policy: no direct routing in, no metadata, no SMTP, host closed to machines
    assert!(s.contains("oifname @bridges drop"));
    assert!(s.contains("ip daddr 169.254.0.0/16 drop"));
    assert!(s.contains("tcp dport { 25, 465, 587 } drop"));
    assert!(s.contains("th dport @host_ports accept\n\t\tdrop"));
    let open = Nftables::new(
        "t",
        Policy {
            host_ports: vec![5432],
            allow_metadata: true,
            block_smtp: false,
        },
    )
    .rebuild_script(&d);
    assert!(open.contains("elements = { 5432 }"));
    assert!(!open.contains("169.254.0.0/16") && !open.contains("dport { 25"));
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
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).chains_health(json),
        Health::InSync
    );
    assert_eq!(
        Nftables::new("sistemo", Policy::default()).chains_health(json),
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
        Nftables::new(TABLE, Policy::default()).chains_health(&inet),
        Health::Drifted(_)
    ));
    let no_forward = edited(json, &[], |o| {
        o["chain"]["table"] == TABLE && o["chain"]["name"] == "forward"
    });
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).chains_health(&no_forward),
        Health::Drifted("chain forward of table ip sistemo_fx is missing".into())
    );
    for garbage in ["", "not json", "{}", r#"{"nftables": 3}"#] {
        assert!(matches!(
            Nftables::new(TABLE, Policy::default()).chains_health(garbage),
            Health::Drifted(_)
        ));
    }
}

#[test]
fn deep_check_counts_the_dnat_rules() {
    let json = fixture!("prerouting");
    assert_eq!(dnat_rules(json, TABLE, "prerouting"), 2);
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).rules_health(json),
        Health::InSync
    );
    let flushed = edited(json, &[], |o| o.get("rule").is_some());
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).rules_health(&flushed),
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
    let tag = Nftables::new(TABLE, Policy::default()).tag();
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
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).chains_health(&chains),
        Health::InSync
    );
    assert_eq!(foreign_drop_forward(&chains, TABLE).len(), 2);
    let rules = edited(fixture!("filter_forward"), &unreadable(), |_| false);
    assert_eq!(
        tagged(&rules, &Nftables::new(TABLE, Policy::default()).tag()).len(),
        3
    );
    let pre = edited(fixture!("prerouting"), &unreadable(), |_| false);
    assert_eq!(
        Nftables::new(TABLE, Policy::default()).rules_health(&pre),
        Health::InSync
    );
}
