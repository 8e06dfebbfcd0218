//! Host links over netlink (rtnetlink): bridges, TAPs, veth enslaving, addresses, neighbours,
//! and the per-interface sysctls the expose path needs. Never touches a link it did not name.

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};
use std::net::{IpAddr, Ipv4Addr};

/// Errors of link management.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Netlink refused a request.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// A link exists with the name but is not what sistemo needs.
    #[error("{0}")]
    Foreign(String),
    /// An I/O error (sysctl, TAP ioctl).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, LinkError>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Netlink { what, source }
}

/// A netlink connection to the current network namespace.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

/// A stable, locally administered unicast MAC for a bridge, derived from its name (FNV-1a).
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0x02, 0x5e, b[0], b[1], b[2], b[3]]
}

/// `route_localnet` on a bridge: needed so that 127.0.0.1 → machine DNAT can be routed out of
/// it, and safe only while the firewall's guard drops 127/8 arriving on it (CVE-2020-8558), so
/// the firewall turns it off whenever its tables are gone and on again once rebuilt.
pub fn set_route_localnet(bridge: &str, on: bool) -> Result<()> {
    sysctl_ipv4(
        &format!("conf/{bridge}/route_localnet"),
        if on { "1" } else { "0" },
    )
}

/// Write a sysctl under `/proc/sys/net/ipv4/`.
pub fn sysctl_ipv4(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    std::fs::write(&path, value).map_err(|source| LinkError::Io {
        what: format!("writing {path}"),
        source,
    })
}

impl Links {
    /// Open a netlink connection (spawns its driver task on the current runtime).
    pub fn new() -> Result<Links> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| LinkError::Io {
            what: "opening a netlink socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Links { handle })
    }

    /// Index and kind of a link, if it exists.
    pub async fn lookup(&self, name: &str) -> Result<Option<(u32, Option<InfoKind>)>> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(Some(msg)) => {
                let kind = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.clone()),
                        _ => None,
                    }),
                    _ => None,
                });
                Ok(Some((msg.header.index, kind)))
            }
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"))(e)),
        }
    }

    /// Every link's message.
    async fn all(&self) -> Result<Vec<rtnetlink::packet_route::link::LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing links"))
    }

    /// Names of all links (for `doctor` and tests).
    pub async fn names(&self) -> Result<Vec<String>> {
        Ok(self.all().await?.iter().filter_map(link_name).collect())
    }

    /// Every link with the name of the bridge it is a port of, if any (the start-up sweep).
    pub async fn with_controllers(&self) -> Result<Vec<(String, Option<String>)>> {
        let msgs = self.all().await?;
        let name = link_name;
        let by_index: std::collections::HashMap<u32, String> = msgs
            .iter()
            .filter_map(|m| Some((m.header.index, name(m)?)))
            .collect();
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let controller = m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Controller(i) => by_index.get(i).cloned(),
                    _ => None,
                });
                Some((name(m)?, controller))
            })
            .collect())
    }

    /// Create the bridge, or adopt it if it already exists as a bridge; give it the gateway
    /// address of `subnet`, bring it up, enable forwarding and turn IPv6 off on it (`route_localnet`
    /// is the firewall's: see [`crate::net::firewall::Firewall::rebuild`]).
    pub async fn ensure_bridge(&self, name: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<u32> {
        let index = match self.lookup(name).await? {
            Some((i, Some(InfoKind::Bridge))) => i,
            Some(_) => {
                return Err(LinkError::Foreign(format!(
                    "a link named {name} exists and is not a bridge; choose another bridge name"
                )));
            }
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await
                    .map_err(nl(format!("creating bridge {name}")))?;
                self.lookup(name)
                    .await?
                    .ok_or_else(|| LinkError::Foreign(format!("bridge {name} vanished after creation")))?
                    .0
            }
        };
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("listing addresses of {name}")))?;
        let has = addrs.iter().any(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(ip)) if *ip == gateway))
        });
        if !has {
            self.handle
                .address()
                .add(index, IpAddr::V4(gateway), subnet.prefix_len())
                .execute()
                .await
                .map_err(nl(format!("adding {gateway}/{} to {name}", subnet.prefix_len())))?;
        }
        // A bridge without an explicit address takes the lowest MAC of its ports and changes it
        // as machines come and go, flushing neighbours and breaking machines' ARP caches for
        // the gateway. Pin a stable, locally administered address derived from the name.
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .address(bridge_mac(name).to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("setting the address of {name}")))?;
        self.up(index, name).await?;
        // Exposes reach machines from every interface of the host, as Docker's do: the host
        // routes. The firewall's forward chain admits into machines only exposed traffic and
        // replies (`doctor` and the README say that the global knob is on).
        sysctl_ipv4("ip_forward", "1")?;
        // sistemo offers machines no IPv6: the bridge has no IPv6 address at all (else its
        // link-local address reaches every host service listening on `::`, around the `ip`
        // table's input chain), and takes no router advertisement (CVE-2020-13401). The bridge
        // table drops machines' IPv6 frames too. Absent when IPv6 is off, which is fine.
        for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("disable_ipv6", "1")] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/{key}"), value);
        }
        // `route_localnet` is the firewall's to set, once its guard is in place.
        Ok(index)
    }

    async fn up(&self, index: u32, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing {name} up")))
    }

    /// Enslave an existing link to a bridge and bring it up.
    pub async fn attach(&self, name: &str, bridge: &str) -> Result<()> {
        let (br, _) = self
            .lookup(bridge)
            .await?
            .ok_or_else(|| LinkError::Foreign(format!("bridge {bridge} does not exist")))?;
        let (idx, _) = self
            .lookup(name)
            .await?
            .ok_or_else(|| LinkError::Foreign(format!("link {name} does not exist")))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
            .execute()
            .await
            .map_err(nl(format!("attaching {name} to {bridge}")))?;
        // Hairpin mode: with bridge netfilter active (Docker and Kubernetes hosts load
        // br_netfilter), a machine reaching its own exposed port is DNATed at the bridge and
        // sent back out of the port it came in on, which the bridge drops without it.
        self.handle
            .link()
            .set_port(LinkBridgePort::new(idx).hairpin(true).build())
            .execute()
            .await
            .map_err(nl(format!("enabling hairpin on {name}")))
    }

    /// Create a persistent TAP, owned by `owner` (the VMM's uid and gid) when given, else by
    /// root; enslaved to `bridge` and up.
    pub async fn create_tap(&self, name: &str, bridge: &str, owner: Option<(u32, u32)>) -> Result<()> {
        if self.lookup(name).await?.is_none() {
            crate::sys::create_persistent_tap(name, owner).map_err(|source| LinkError::Io {
                what: format!("creating TAP {name}"),
                source,
            })?;
        }
        if let Err(e) = self.attach(name, bridge).await {
            let _ = self.delete(name).await;
            return Err(e);
        }
        Ok(())
    }

    /// Create a persistent TAP on no bridge and down (a template's, or a restored clone's until
    /// it has its own identity), owned by `owner` when given.
    pub async fn create_detached_tap(&self, name: &str, owner: Option<(u32, u32)>) -> Result<()> {
        if self.lookup(name).await?.is_none() {
            crate::sys::create_persistent_tap(name, owner).map_err(|source| LinkError::Io {
                what: format!("creating TAP {name}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Create an `ifb` link `name` (up) unless it exists: see `shaping`. A link of that name
    /// of another kind is not ours: an error.
    pub async fn ensure_ifb(&self, name: &str) -> Result<()> {
        match self.lookup(name).await? {
            Some((_, Some(InfoKind::Ifb))) => {}
            Some(_) => {
                return Err(LinkError::Foreign(format!(
                    "link {name} exists and is not an ifb; sistemo leaves it alone"
                )));
            }
            None => self
                .handle
                .link()
                .add(rtnetlink::LinkIfb::new(name).up().build())
                .execute()
                .await
                .map_err(nl(format!("creating ifb {name}")))?,
        }
        Ok(())
    }

    /// Delete a link by name; absent is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        if let Some((idx, _)) = self.lookup(name).await? {
            match self.handle.link().del(idx).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(nl(format!("deleting link {name}"))(e)),
            }
        }
        Ok(())
    }

    /// Forget any neighbour (ARP) entry for `ip`, so a reused address is not sent to a stale MAC.
    pub async fn flush_neighbour(&self, ip: Ipv4Addr) -> Result<()> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing neighbours"))?;
        for m in msgs {
            let hit = m
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip));
            if hit {
                let _ = self.handle.neighbours().del(m).execute().await;
            }
        }
        Ok(())
    }

    /// IPv4 networks routed by the host (to refuse overlapping subnets for new networks).
    pub async fn routed_v4(&self) -> Result<Vec<Ipv4Net>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        let routes: Vec<_> = self
            .handle
            .route()
            .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        let mut out = vec![];
        for r in routes {
            if r.header.destination_prefix_length == 0 {
                continue;
            }
            for a in &r.attributes {
                if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a
                    && let Ok(n) = Ipv4Net::new(*d, r.header.destination_prefix_length)
                {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

/// What the services need from the host's links; [`Links`] is the netlink implementation, and
/// unit tests use an in-memory one.
#[async_trait::async_trait]
pub trait HostLinks: Send + Sync {
    /// See [`Links::ensure_bridge`].
    async fn ensure_bridge(&self, name: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<()>;
    /// Whether a link of that name exists.
    async fn exists(&self, name: &str) -> Result<bool>;
    /// See [`Links::attach`].
    async fn attach(&self, name: &str, bridge: &str) -> Result<()>;
    /// See [`Links::create_tap`] (root-owned).
    async fn create_tap(&self, name: &str, bridge: &str) -> Result<()>;
    /// See [`Links::create_tap`]; the default ignores `owner`.
    async fn create_tap_owned(&self, name: &str, bridge: &str, owner: Option<(u32, u32)>) -> Result<()> {
        let _ = owner;
        self.create_tap(name, bridge).await
    }
    /// See [`Links::create_detached_tap`]; [`HostLinks::attach`] puts it on its bridge.
    async fn create_detached_tap(&self, name: &str, owner: Option<(u32, u32)>) -> Result<()>;
    /// See [`Links::delete`].
    async fn delete(&self, name: &str) -> Result<()>;
    /// See [`Links::flush_neighbour`].
    async fn flush_neighbour(&self, ip: Ipv4Addr) -> Result<()>;
    /// IPv4 networks the host routes.
    async fn routed_v4(&self) -> Result<Vec<Ipv4Net>>;
    /// Every link with the bridge it is a port of (default: none known; the start-up sweep).
    async fn with_controllers(&self) -> Result<Vec<(String, Option<String>)>> {
        Ok(Vec::new())
    }
    /// Put a machine's network rate limits on its host-side link `name` (idempotent).
    async fn shape(&self, _name: &str, _io: &sistemo_vmm::IoLimits) -> Result<()> {
        Ok(())
    }
    /// Remove what [`HostLinks::shape`] added beside the link `name`; absent is fine.
    async fn unshape(&self, _name: &str) -> Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl HostLinks for Links {
    async fn ensure_bridge(&self, name: &str, subnet: Ipv4Net, gateway: Ipv4Addr) -> Result<()> {
        Links::ensure_bridge(self, name, subnet, gateway).await.map(drop)
    }
    async fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.lookup(name).await?.is_some())
    }
    async fn attach(&self, name: &str, bridge: &str) -> Result<()> {
        Links::attach(self, name, bridge).await
    }
    async fn create_tap(&self, name: &str, bridge: &str) -> Result<()> {
        Links::create_tap(self, name, bridge, None).await
    }
    async fn create_tap_owned(&self, name: &str, bridge: &str, owner: Option<(u32, u32)>) -> Result<()> {
        Links::create_tap(self, name, bridge, owner).await
    }
    async fn create_detached_tap(&self, name: &str, owner: Option<(u32, u32)>) -> Result<()> {
        Links::create_detached_tap(self, name, owner).await
    }
    async fn delete(&self, name: &str) -> Result<()> {
        Links::delete(self, name).await
    }
    async fn flush_neighbour(&self, ip: Ipv4Addr) -> Result<()> {
        Links::flush_neighbour(self, ip).await
    }
    async fn shape(&self, name: &str, io: &sistemo_vmm::IoLimits) -> Result<()> {
        super::shaping::apply(self, name, io).await
    }
    async fn unshape(&self, name: &str) -> Result<()> {
        super::shaping::remove(self, name).await
    }
    async fn routed_v4(&self) -> Result<Vec<Ipv4Net>> {
        Links::routed_v4(self).await
    }
    async fn with_controllers(&self) -> Result<Vec<(String, Option<String>)>> {
        Links::with_controllers(self).await
    }
}
/// A link's name, from its message.
fn link_name(m: &rtnetlink::packet_route::link::LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}
