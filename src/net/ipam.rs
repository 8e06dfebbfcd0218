//! Address planning for networks: whether a subnet is free of sistemo's other networks and of
//! the host's routes, and which subnet a new network gets. Machine addresses are leased by the store.

use crate::domain::{NetworkName, Subnet};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// What `candidate` overlaps among the `taken` networks and the host's `routes`, named for an
/// error message, or `None` when it is free.
pub fn overlap(candidate: Subnet, taken: &[(NetworkName, Subnet)], routes: &[Ipv4Net]) -> Option<String> {
    if let Some((name, subnet)) = taken.iter().find(|(_, s)| s.overlaps(candidate.net())) {
        return Some(format!("network {name} ({subnet})"));
    }
    routes
        .iter()
        .find(|r| candidate.overlaps(**r))
        .map(|r| format!("host route {r}"))
}

/// The first free `10.X.0.0/24` after the default `10.200.0.0/16`, X from 201 on.
pub fn choose(taken: &[(NetworkName, Subnet)], routes: &[Ipv4Net]) -> Option<Subnet> {
    (201..=255u8)
        .chain(1..200)
        .filter_map(|x| Subnet::check("subnet", Ipv4Net::new(Ipv4Addr::new(10, x, 0, 0), 24).ok()?).ok())
        .find(|s| overlap(*s, taken, routes).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(name: &str, subnet: &str) -> (NetworkName, Subnet) {
        (name.parse().unwrap(), subnet.parse().unwrap())
    }

    #[test]
    fn overlaps_are_named_and_free_subnets_chosen() {
        let nets = [net("default", "10.200.0.0/16"), net("blue", "10.201.0.0/24")];
        let routes: Vec<Ipv4Net> = vec!["10.202.0.0/16".parse().unwrap()];
        let o = overlap("10.201.0.128/25".parse().unwrap(), &nets, &routes).unwrap();
        assert_eq!(o, "network blue (10.201.0.0/24)");
        let o = overlap("10.202.7.0/24".parse().unwrap(), &nets, &routes).unwrap();
        assert_eq!(o, "host route 10.202.0.0/16");
        assert_eq!(overlap("10.9.0.0/24".parse().unwrap(), &nets, &routes), None);
        assert_eq!(choose(&nets, &routes).unwrap().to_string(), "10.203.0.0/24");
    }
}
