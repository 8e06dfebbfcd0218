//! Host networking: links over netlink ([`link`]), address planning ([`ipam`]) and the
//! port-forwarding firewall ([`firewall`]) and its connection tracking ([`conntrack`]).
//! Nothing outside this module creates links or talks to nftables.

pub mod conntrack;
pub mod firewall;
pub mod ipam;
pub mod link;
pub mod shaping;

/// A machine's MAC, derived from its lease: a locally administered unicast prefix, one byte of
/// the network's name, then the leased IPv4 address. Unique on a host (networks' subnets never
/// overlap), the same for the same lease, and never random.
pub fn mac_for(network: &str, ip: std::net::Ipv4Addr) -> [u8; 6] {
    let h = network.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [a, b, c, d] = ip.octets();
    [0x52, (h ^ h >> 8 ^ h >> 16 ^ h >> 24) as u8, a, b, c, d]
}

/// The MAC of a machine made before MACs were derived from the lease (from 4 bytes of its
/// ID): kept for those machines, whose running link has it.
pub fn legacy_mac_for(id: &uuid::Uuid) -> [u8; 6] {
    let b = id.as_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

/// Host-side interface name for a machine: `sm` + 10 hex digits of its ID (fits IFNAMSIZ).
pub fn host_ifname(id: &uuid::Uuid) -> String {
    format!("sm{}", &id.simple().to_string()[..10])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_derived_from_the_lease() {
        let ip = "10.200.0.2".parse().unwrap();
        let m = mac_for("default", ip);
        assert_eq!(m, mac_for("default", ip), "deterministic");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(&m[2..], &[10, 200, 0, 2], "the leased address");
        assert_ne!(m, mac_for("default", "10.200.0.3".parse().unwrap()));
        assert_ne!(m[1], mac_for("blue", ip)[1], "the network counts");
        // never the bridges' prefix (02:5e) nor the template's MAC
        assert_ne!(&m[..2], &[0x02, 0x5e]);
    }
}
