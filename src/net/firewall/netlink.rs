//! Map element changes straight over nf_tables netlink: one batch (one transaction) per expose
//! or unexpose, no `nft` process and no cache fetch, so the cost does not grow with the map.

use super::{FirewallError, PortMapping};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;

    #[test]
    fn keys_and_values_are_register_aligned() {
        let m = PortMapping {
            bind: None,
            proto: Protocol::Tcp,
            host_port: 8080,
            ip: "10.200.0.2".parse().unwrap(),
            machine_port: 80,
        };
        assert_eq!(key(&m), vec![6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(value(&m), vec![10, 200, 0, 2, 0, 80, 0, 0]);
        let b = PortMapping {
            bind: Some("127.0.0.1".parse().unwrap()),
            proto: Protocol::Udp,
            ..m
        };
        assert_eq!(key(&b), vec![127, 0, 0, 1, 17, 0, 0, 0, 0x1f, 0x90, 0, 0]);
    }
}
