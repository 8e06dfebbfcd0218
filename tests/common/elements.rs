//! sistemo's DNAT map elements as the kernel holds them (`nft -j list map`) and as the
//! database says it must (`sistemo ports`), in one comparable form.

use super::*;
use serde_json::Value;
use std::collections::BTreeSet;

fn json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// One element as `bind|proto|port -> ip:port`.
pub type Element = String;

pub fn elem(bind: Option<&str>, proto: &str, port: u64, ip: &str, mport: u64) -> Element {
    format!("{}|{proto}|{port} -> {ip}:{mport}", bind.unwrap_or("*"))
}

/// What the kernel's two maps hold, from `nft -j list map`.
pub fn kernel_elements(env: &Env) -> BTreeSet<Element> {
    let mut out = BTreeSet::new();
    for map in ["expose_any", "expose_bound"] {
        let o = env.sh(&format!("nft -j list map ip {} {map}", env.table));
        assert!(
            o.status.success(),
            "nft list map {map}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let Some(elems) = v["nftables"][1]["map"]["elem"].as_array() else {
            continue;
        };
        for e in elems {
            let k = e[0]["concat"].as_array().unwrap();
            let d = e[1]["concat"].as_array().unwrap();
            let (bind, k) = if k.len() == 3 {
                (k[0].as_str(), &k[1..])
            } else {
                (None, &k[..])
            };
            out.insert(elem(
                bind,
                k[0].as_str().unwrap(),
                k[1].as_u64().unwrap(),
                d[0].as_str().unwrap(),
                d[1].as_u64().unwrap(),
            ));
        }
    }
    out
}

pub fn range(s: &str) -> (u64, u64) {
    match s.split_once('-') {
        Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
        None => (s.parse().unwrap(), s.parse().unwrap()),
    }
}

/// What the database says the maps must hold: `ports` rows that are `active`, with their
/// machines' addresses.
pub fn database_elements(env: &Env, machines: &[Value]) -> BTreeSet<Element> {
    let mut out = BTreeSet::new();
    for r in json(env, &["ports", "-o", "json"]).as_array().unwrap() {
        if r["state"] != "active" {
            continue;
        }
        let ip = machines
            .iter()
            .find(|m| m["name"] == r["machine"])
            .and_then(|m| m["ip"].as_str())
            .unwrap_or_else(|| panic!("no machine for port row {r}"));
        let (h0, h1) = range(r["host_port"].as_str().unwrap());
        let (m0, _) = range(r["machine_port"].as_str().unwrap());
        for p in h0..=h1 {
            out.insert(elem(
                r["bind"].as_str(),
                r["protocol"].as_str().unwrap(),
                p,
                ip,
                m0 + (p - h0),
            ));
        }
    }
    out
}
