//! Host networking: links over netlink ([`link`]), address planning ([`ipam`]) and the
//! port-forwarding firewall ([`firewall`]) and its connection tracking ([`conntrack`]).
//! Nothing outside this module creates links or talks to nftables.

pub mod conntrack;
pub mod firewall;
pub mod ipam;
pub mod link;
pub mod shaping;

/// A stable, locally administered unicast MAC derived from a machine ID.
pub fn mac_for(id: &uuid::Uuid) -> [u8; 6] {
    let b = id.as_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

/// Host-side interface name for a machine: `sm` + 10 hex digits of its ID (fits IFNAMSIZ).
pub fn host_ifname(id: &uuid::Uuid) -> String {
    format!("sm{}", &id.simple().to_string()[..10])
}
