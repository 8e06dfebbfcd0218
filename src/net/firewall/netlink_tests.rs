//! Tests of the netlink element changes and reads: encodings, and a real kernel table in a
//! private network namespace.
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

#[test]
fn parse_generation_and_elements() {
    // NFTA_GEN_ID (be32 7), then NFTA_GEN_PROC_PID
    let mut body = Vec::new();
    attr(&mut body, NFTA_GEN_ID, &7u32.to_be_bytes());
    attr(&mut body, 2, &1234u32.to_be_bytes());
    assert_eq!(parse_genid(&body), Some(7));
    assert_eq!(parse_genid(&[]), None);

    let m = PortMapping {
        bind: Some("10.0.0.1".parse().unwrap()),
        proto: Protocol::Udp,
        host_port: 5353,
        ip: "10.200.0.9".parse().unwrap(),
        machine_port: 53,
    };
    let (buf, _) = batch("t", Op::Add, &[("expose_bound", vec![&m])], 1);
    // the element-list message sits after the 20-byte batch-begin message
    let msg = &replies(&buf)[1];
    assert_eq!(parse_elements(&msg.body[4..]), vec![Some(m)]);
    let any = PortMapping { bind: None, ..m };
    assert_eq!(mapping_of(&key(&any), &value(&any)), Some(any));
    assert_eq!(mapping_of(&[1, 2, 3], &value(&any)), None);
    assert_eq!(mapping_of(&key(&any), &[0; 4]), None);
}

/// Runs `f` on a thread in a network namespace of its own (gone when the thread ends);
/// `nft` started from it runs there too.
pub(crate) fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .expect("test thread");
}

pub(crate) fn nft(script: &str) {
    use std::io::Write as _;
    let mut c = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft -f failed: {script}");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn generation_moves_once_per_commit_and_elements_read_back() {
    in_private_netns(|| {
        assert!(elements("t", "expose_any").unwrap().is_none(), "no table yet");
        nft("table ip t { map expose_any { type inet_proto . inet_service : ipv4_addr . inet_service; }; }");
        let g0 = generation().unwrap();
        let ms: Vec<PortMapping> = (0..2500)
            .map(|i| PortMapping {
                bind: None,
                proto: Protocol::Tcp,
                host_port: 10000 + i,
                ip: "10.200.0.2".parse().unwrap(),
                machine_port: 80,
            })
            .collect();
        apply("t", Op::Add, &[("expose_any", ms.iter().collect())]).unwrap();
        assert_eq!(
            generation().unwrap(),
            g0.wrapping_add(1),
            "one batch, one generation"
        );
        // The set's hash table may still be resizing after the bulk insert (the kernel does
        // it later, in a worker); a dump racing it can skip or repeat elements, which the
        // reconciler answers with a second read. Here: read until it settles.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let have = loop {
            let got = elements("t", "expose_any").unwrap().unwrap();
            assert!(!got.interrupted);
            assert_eq!(got.foreign, 0);
            let mut have = got.mappings.clone();
            have.sort_by_key(|m| m.host_port);
            if have == ms || std::time::Instant::now() >= deadline {
                break have;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(
            have == ms,
            "2,500 elements over several dump datagrams: read {}",
            have.len()
        );
        // deleting one present and one absent element aborts the whole batch
        let absent = PortMapping {
            host_port: 9,
            ..ms[0]
        };
        assert!(apply("t", Op::Delete, &[("expose_any", vec![&ms[0], &absent])]).is_err());
        assert_eq!(
            generation().unwrap(),
            g0.wrapping_add(1),
            "an aborted batch commits nothing"
        );
        assert_eq!(elements("t", "expose_any").unwrap().unwrap().mappings.len(), 2500);
    });
}
