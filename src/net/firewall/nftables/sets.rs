//! The drift check of the tables' sets (bridges, subnets, host ports, and the bridge table's
//! machine ports with their MAC and IP bindings): each set's keys as the kernel holds them,
//! read over netlink, against the keys the desired state gives.

use super::*;
use netlink::{NFPROTO_BRIDGE, NFPROTO_IP, SetKeys};
use std::collections::BTreeSet;

/// An `ifname` key: the name, NUL-padded to IFNAMSIZ.
fn ifname(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

/// Concatenation fields sit in 32-bit registers: each is padded to a multiple of 4 bytes.
fn concat(fields: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![];
    for f in fields {
        k.extend_from_slice(f);
        k.resize(k.len().div_ceil(4) * 4, 0);
    }
    k
}

type Keys = BTreeSet<(Vec<u8>, bool)>;

fn plain(keys: impl IntoIterator<Item = Vec<u8>>) -> Keys {
    keys.into_iter().map(|k| (k, false)).collect()
}

impl Nftables {
    /// Every set of both tables with the keys `desired` puts in it: (family, set, keys).
    pub(super) fn wanted_sets(&self, desired: &Desired) -> Vec<(u8, &'static str, Keys)> {
        // An interval set holds each range as its start and, flagged as an end, the first
        // address after it (none after 255.255.255.255).
        let mut subnets = Keys::new();
        for b in &desired.bridges {
            subnets.insert((b.subnet.network().octets().to_vec(), false));
            if let Some(next) = u32::from(b.subnet.broadcast()).checked_add(1) {
                subnets.insert((next.to_be_bytes().to_vec(), true));
            }
        }
        let ports = &desired.ports;
        vec![
            (
                NFPROTO_IP,
                SET_BRIDGES,
                plain(desired.bridges.iter().map(|b| ifname(&b.bridge))),
            ),
            (NFPROTO_IP, SET_SUBNETS, subnets),
            (
                NFPROTO_IP,
                SET_HOST_PORTS,
                plain(self.policy.host_ports.iter().map(|p| p.to_be_bytes().to_vec())),
            ),
            (
                NFPROTO_BRIDGE,
                SET_PORTS,
                plain(ports.iter().map(|p| ifname(&p.ifname))),
            ),
            (
                NFPROTO_BRIDGE,
                SET_PORT_MAC,
                plain(ports.iter().map(|p| concat(&[&ifname(&p.ifname), &p.mac]))),
            ),
            (
                NFPROTO_BRIDGE,
                SET_PORT_IP,
                plain(
                    ports
                        .iter()
                        .map(|p| concat(&[&ifname(&p.ifname), &p.ip.octets()])),
                ),
            ),
        ]
    }

    /// How the kernel's sets differ from `desired`, or None when they are equal. A missing set
    /// is the structural check's to report.
    pub(super) fn sets_drift(&self, desired: &Desired) -> Result<Option<String>, FirewallError> {
        for (family, set, want) in self.wanted_sets(desired) {
            // A dump that raced a change is read again.
            let mut tries = 0;
            let have = loop {
                tries += 1;
                match netlink::set_keys(family, &self.table, set)? {
                    None => return Ok(None),
                    Some(SetKeys {
                        interrupted: true, ..
                    }) if tries < 3 => continue,
                    Some(k) => break k.keys,
                }
            };
            // nft may open an interval set with an end at 0.0.0.0: no range, nothing to compare.
            let have: Keys = have
                .into_iter()
                .filter(|(k, end)| !(*end && k.iter().all(|b| *b == 0)))
                .collect();
            if have != want {
                let fam = if family == NFPROTO_BRIDGE {
                    "bridge"
                } else {
                    FAMILY
                };
                return Ok(Some(format!(
                    "set {set} of table {fam} {}: {} unexpected, {} missing",
                    self.table,
                    have.difference(&want).count(),
                    want.difference(&have).count()
                )));
            }
        }
        Ok(None)
    }
}
