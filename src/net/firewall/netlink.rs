//! Map element changes straight over nf_tables netlink: one batch (one transaction) per expose
//! or unexpose, no `nft` process and no cache fetch, so the cost does not grow with the map.
//! Also the two reads the drift check needs: the ruleset generation (`NFT_MSG_GETGEN`, one
//! round trip, bumped by every committed transaction) and a map's elements (`NFT_MSG_GETSETELEM`
//! dump), parsed back into [`PortMapping`]s.

use super::{FirewallError, PortMapping};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// Elements per netlink message (about 44 bytes each, well under the 64 KiB attribute limit).
const ELEMS_PER_MESSAGE: usize = 1000;
/// How long to wait for the kernel's acknowledgements before giving up.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether elements are added or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `add element`.
    Add,
    /// `delete element`.
    Delete,
}

/// Concatenation fields sit in 32-bit registers: each is padded to a multiple of 4 bytes.
fn push_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// Inverse of [`push_field`]: the first `n` bytes of the next register-aligned field.
fn take_field<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let padded = n.div_ceil(4) * 4;
    if b.len() < padded {
        return None;
    }
    let (f, rest) = b.split_at(padded);
    *b = rest;
    Some(&f[..n])
}

/// The mapping an element of a map holds: `key` and `value` as [`key`] and [`value`] write them
/// (a key of 12 bytes is a bound one, of 8 a wildcard one). None for anything else.
pub fn mapping_of(key: &[u8], value: &[u8]) -> Option<PortMapping> {
    let mut k = key;
    let bind = match key.len() {
        12 => Some(std::net::Ipv4Addr::from(
            <[u8; 4]>::try_from(take_field(&mut k, 4)?).ok()?,
        )),
        8 => None,
        _ => return None,
    };
    let proto = match take_field(&mut k, 1)?[0] {
        6 => crate::spec::Protocol::Tcp,
        17 => crate::spec::Protocol::Udp,
        _ => return None,
    };
    let host_port = u16::from_be_bytes(take_field(&mut k, 2)?.try_into().ok()?);
    if value.len() != 8 {
        return None;
    }
    let mut v = value;
    let ip = std::net::Ipv4Addr::from(<[u8; 4]>::try_from(take_field(&mut v, 4)?).ok()?);
    let machine_port = u16::from_be_bytes(take_field(&mut v, 2)?.try_into().ok()?);
    Some(PortMapping {
        bind,
        proto,
        host_port,
        ip,
        machine_port,
    })
}

/// Key of a mapping in its map: `[addr .] proto . port`.
pub fn key(m: &PortMapping) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    if let Some(b) = m.bind {
        push_field(&mut k, &b.octets());
    }
    let proto: u8 = match m.proto {
        crate::spec::Protocol::Tcp => 6,
        crate::spec::Protocol::Udp => 17,
    };
    push_field(&mut k, &[proto]);
    push_field(&mut k, &m.host_port.to_be_bytes());
    k
}

/// Value of a mapping: `machine_addr . machine_port`.
pub fn value(m: &PortMapping) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    push_field(&mut v, &m.ip.octets());
    push_field(&mut v, &m.machine_port.to_be_bytes());
    v
}

fn attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

fn nested(out: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    f(&mut inner);
    attr(out, ty | NLA_F_NESTED, &inner);
}

fn message(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, body: &[u8]) {
    let len = 16 + 4 + body.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[family, 0]);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Build the batch: begin, one element-list message per map, end.
pub fn batch(table: &str, op: Op, groups: &[(&str, Vec<&PortMapping>)], seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut out = Vec::new();
    let mut acked = Vec::new();
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut s = seq + 1;
    // Attribute lengths are 16 bits: a message carries at most ELEMS_PER_MESSAGE elements; a
    // batch of several messages is still one transaction.
    let chunks = groups
        .iter()
        .flat_map(|(map, items)| items.chunks(ELEMS_PER_MESSAGE).map(move |c| (*map, c)));
    for (map, items) in chunks {
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(map));
        nested(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS, |els| {
            for m in items {
                nested(els, NFTA_LIST_ELEM, |e| {
                    nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, &key(m)));
                    if op == Op::Add {
                        nested(e, NFTA_SET_ELEM_DATA, |d| attr(d, NFTA_DATA_VALUE, &value(m)));
                    }
                });
            }
        });
        let (ty, flags) = match op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            s,
            NFPROTO_IPV4,
            0,
            &body,
        );
        acked.push(s);
        s += 1;
    }
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        s,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    (out, acked)
}

/// Send one batch and wait for every acknowledgement; the first error fails the whole batch
/// (the kernel applies a batch all or nothing).
pub fn apply(table: &str, op: Op, groups: &[(&str, Vec<&PortMapping>)]) -> Result<(), FirewallError> {
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    let (buf, mut waiting) = batch(table, op, groups, seq);
    if waiting.is_empty() {
        return Ok(());
    }
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    crate::sys::set_recv_timeout(&sock, ACK_TIMEOUT)?;
    if buf.len() > 128 << 10 {
        crate::sys::force_send_buffer(&sock, buf.len() * 2 + 4096)?;
    }
    sock.send_to(&buf, &SocketAddr::new(0, 0), 0)?;
    let mut rx = vec![0u8; 64 << 10];
    let mut failure: Option<String> = None;
    while !waiting.is_empty() {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(rx[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(rx[off + 4..off + 6].try_into().expect("2 bytes"));
            let seq = u32::from_ne_bytes(rx[off + 8..off + 12].try_into().expect("4 bytes"));
            if len < 16 || off + len > n {
                break;
            }
            if ty == NLMSG_ERROR && len >= 20 {
                let code = i32::from_ne_bytes(rx[off + 16..off + 20].try_into().expect("4 bytes"));
                waiting.retain(|s| *s != seq);
                if code != 0 && failure.is_none() {
                    failure = Some(format!(
                        "{} elements: {}",
                        if op == Op::Add { "adding" } else { "deleting" },
                        std::io::Error::from_raw_os_error(-code)
                    ));
                    // After an error the kernel aborts the batch; no further acks come.
                    waiting.clear();
                }
            }
            off += len.div_ceil(4) * 4;
        }
    }
    match failure {
        Some(f) => Err(FirewallError::Rejected(f)),
        None => Ok(()),
    }
}

/// Netlink attributes of `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[(len.div_ceil(4) * 4).min(buf.len())..];
        Some((ty, payload))
    })
}

fn attr_of(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

/// One netlink message of an answer: type, flags and payload after the `nfgenmsg` header.
struct Reply<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    body: &'a [u8],
}

/// The messages of one received datagram.
fn replies(buf: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        out.push(Reply {
            ty: u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes")),
            flags: u16::from_ne_bytes(buf[off + 6..off + 8].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes")),
            body: &buf[off + 16..off + len],
        });
        off += len.div_ceil(4) * 4;
    }
    out
}

/// The error code of an `NLMSG_ERROR` body (0 is an acknowledgement).
fn error_code(body: &[u8]) -> i32 {
    body.get(..4)
        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

fn socket() -> Result<Socket, FirewallError> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    crate::sys::set_recv_timeout(&sock, ACK_TIMEOUT)?;
    Ok(sock)
}

/// From a `NFT_MSG_NEWGEN` answer's body (after `nfgenmsg`): the generation id.
pub fn parse_genid(body: &[u8]) -> Option<u32> {
    attr_of(body, NFTA_GEN_ID)
        .and_then(|p| p.get(..4))
        .map(|p| u32::from_be_bytes(p.try_into().expect("4 bytes")))
}

/// The ruleset's generation id: the kernel bumps it on every committed transaction of any
/// table in this network namespace, so an unchanged id means an unchanged ruleset.
pub fn generation() -> Result<u32, FirewallError> {
    let sock = socket()?;
    let mut req = Vec::new();
    message(
        &mut req,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST,
        1,
        0,
        0,
        &[],
    );
    sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
    let mut rx = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        for r in replies(&rx[..n]) {
            if r.ty == NLMSG_ERROR {
                let code = error_code(r.body);
                if code != 0 {
                    return Err(FirewallError::Io(std::io::Error::from_raw_os_error(-code)));
                }
            } else if r.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                return parse_genid(r.body.get(4..).unwrap_or_default()).ok_or_else(|| {
                    FirewallError::Io(std::io::Error::other("generation answer without NFTA_GEN_ID"))
                });
            }
        }
    }
}

/// The mappings of one element-list message's body (after `nfgenmsg`); elements that are not
/// a mapping of sistemo's shape are returned as None.
pub fn parse_elements(body: &[u8]) -> Vec<Option<PortMapping>> {
    let Some(list) = attr_of(body, NFTA_SET_ELEM_LIST_ELEMENTS) else {
        return vec![];
    };
    attrs(list)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .map(|(_, e)| {
            let k = attr_of(e, NFTA_SET_ELEM_KEY).and_then(|k| attr_of(k, NFTA_DATA_VALUE))?;
            let v = attr_of(e, NFTA_SET_ELEM_DATA).and_then(|d| attr_of(d, NFTA_DATA_VALUE))?;
            mapping_of(k, v)
        })
        .collect()
}

/// What a map holds, read with one `NFT_MSG_GETSETELEM` dump.
#[derive(Debug, Default)]
pub struct Elements {
    /// Elements of sistemo's shape.
    pub mappings: Vec<PortMapping>,
    /// Elements that are not (a foreign key or value layout).
    pub foreign: usize,
    /// The map changed while it was dumped (`NLM_F_DUMP_INTR`): read it again.
    pub interrupted: bool,
}

/// The elements of map `map` of table `ip <table>`; `Ok(None)` when the table or map is missing.
pub fn elements(table: &str, map: &str) -> Result<Option<Elements>, FirewallError> {
    let mut out = Elements::default();
    let Some(interrupted) = dump(NFPROTO_IPV4, table, map, |body| {
        for m in parse_elements(body) {
            match m {
                Some(m) => out.mappings.push(m),
                None => out.foreign += 1,
            }
        }
    })?
    else {
        return Ok(None);
    };
    out.interrupted = interrupted;
    // A map's keys are unique, but a dump resumed across datagrams may repeat the element it
    // stopped at (seen under load): count each element once.
    let mut seen = std::collections::HashSet::with_capacity(out.mappings.len());
    out.mappings.retain(|m| seen.insert(*m));
    Ok(Some(out))
}

/// The `nfproto` of a `bridge` table.
pub const NFPROTO_BRIDGE: u8 = 7;
/// The `nfproto` of an `ip` table.
pub const NFPROTO_IP: u8 = NFPROTO_IPV4;

/// What a set holds: each element's key bytes, and whether it ends an interval
/// (`NFT_SET_ELEM_INTERVAL_END`, in sets with `flags interval`).
#[derive(Debug, Default)]
pub struct SetKeys {
    /// Keys, each once, with the interval-end flag.
    pub keys: std::collections::BTreeSet<(Vec<u8>, bool)>,
    /// The set changed while it was dumped: read it again.
    pub interrupted: bool,
}

/// The keys of set `set` of table `<family> <table>`; `Ok(None)` when the table or set is missing.
pub fn set_keys(family: u8, table: &str, set: &str) -> Result<Option<SetKeys>, FirewallError> {
    const NFTA_SET_ELEM_FLAGS: u16 = 3;
    const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
    let mut out = SetKeys::default();
    let Some(interrupted) = dump(family, table, set, |body| {
        let Some(list) = attr_of(body, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            return;
        };
        for (_, e) in attrs(list).filter(|(t, _)| *t == NFTA_LIST_ELEM) {
            let key = attr_of(e, NFTA_SET_ELEM_KEY)
                .and_then(|k| attr_of(k, NFTA_DATA_VALUE))
                .unwrap_or_default();
            let end = attr_of(e, NFTA_SET_ELEM_FLAGS)
                .and_then(|f| f.get(..4))
                .is_some_and(|f| {
                    u32::from_be_bytes(f.try_into().expect("4 bytes")) & NFT_SET_ELEM_INTERVAL_END != 0
                });
            out.keys.insert((key.to_vec(), end));
        }
    })?
    else {
        return Ok(None);
    };
    out.interrupted = interrupted;
    Ok(Some(out))
}

/// One `NFT_MSG_GETSETELEM` dump of set `set` of table `<family> <table>`: `each` gets every
/// element-list message's body (after `nfgenmsg`). `Ok(None)` when the table or set is
/// missing, else whether the set changed during the dump (`NLM_F_DUMP_INTR`).
fn dump(
    family: u8,
    table: &str,
    set: &str,
    mut each: impl FnMut(&[u8]),
) -> Result<Option<bool>, FirewallError> {
    let sock = socket()?;
    let mut body = Vec::new();
    attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
    attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
    let mut req = Vec::new();
    message(
        &mut req,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        family,
        0,
        &body,
    );
    sock.send_to(&req, &SocketAddr::new(0, 0), 0)?;
    let mut interrupted = false;
    // The kernel sizes each dump datagram by the largest read buffer seen (up to 32 KiB).
    let mut rx = vec![0u8; 64 << 10];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        for r in replies(&rx[..n]) {
            if r.seq != 1 {
                continue;
            }
            if r.flags & NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            match r.ty {
                NLMSG_DONE => return Ok(Some(interrupted)),
                NLMSG_ERROR => {
                    let code = error_code(r.body);
                    if code == -libc::ENOENT {
                        return Ok(None);
                    }
                    if code != 0 {
                        return Err(FirewallError::Io(std::io::Error::from_raw_os_error(-code)));
                    }
                }
                t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => {
                    each(r.body.get(4..).unwrap_or_default());
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
#[path = "netlink_tests.rs"]
pub(crate) mod tests;
