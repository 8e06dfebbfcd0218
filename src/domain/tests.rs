//! Tests of the domain types: every spelling each parser accepts, and what it refuses.

use super::*;

#[test]
fn sizes_in_every_spelling() {
    for (s, b) in [
        ("512M", 512u64 << 20),
        ("512", 512 << 20),
        ("2G", 2 << 30),
        ("2GB", 2 << 30),
        ("10GiB", 10 << 30),
        ("1024k", 1 << 20),
        ("4096B", 4096),
        (" 1T ", 1 << 40),
    ] {
        assert_eq!(ByteSize::parse("memory", s).unwrap().as_bytes(), b, "{s}");
    }
    let e = ByteSize::parse("memory", "12X").unwrap_err().to_string();
    assert!(e.contains("\"12X\"") && e.contains("allowed"), "{e}");
    assert!(
        ByteSize::parse("memory", "0")
            .unwrap_err()
            .0
            .contains("greater than zero")
    );
    assert!(ByteSize::parse("memory", "99999999999T").is_err());
    assert!(ByteSize::parse("memory", "G").is_err());
    assert_eq!(ByteSize::mib(2048).to_string(), "2G");
    assert_eq!(ByteSize::mib(1536).to_string(), "1536M");
}

#[test]
fn names() {
    "web-1".parse::<MachineName>().unwrap();
    for bad in ["", "Web", "a b", "-x", "x-", &"a".repeat(64), "x;rm"] {
        let e = bad.parse::<MachineName>().unwrap_err().0;
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
    let id = uuid::Uuid::new_v4().to_string();
    assert!(id.parse::<MachineName>().unwrap_err().0.contains("machine ID"));
    assert!(
        "abcdefghijkl".parse::<NetworkName>().is_err(),
        "sis- + 12 exceeds IFNAMSIZ"
    );
    let longest: NetworkName = "abcdefghijk".parse().unwrap();
    longest.bridge().as_str().parse::<IfName>().unwrap();
    assert_eq!(
        "blue".parse::<NetworkName>().unwrap().bridge().as_str(),
        "sis-blue"
    );
    "sistemo_0".parse::<IfName>().unwrap();
    assert!("sixteen-chars-xx".parse::<IfName>().is_err());
    assert!(serde_json::from_str::<MachineName>("\"Bad\"").is_err());
}

#[test]
fn subnets() {
    Subnet::parse("subnet", "10.201.0.0/24").unwrap();
    assert!(
        Subnet::parse("subnet", "10.201.0.1/24")
            .unwrap_err()
            .0
            .contains("host bits")
    );
    assert!(
        Subnet::parse("subnet", "10.0.0.0/30")
            .unwrap_err()
            .0
            .contains("/30")
    );
    assert!(Subnet::parse("subnet", "10.0.0.0/7").is_err());
    assert!(
        Subnet::parse("subnet", "nope")
            .unwrap_err()
            .0
            .contains("\"nope\"")
    );
    let s = Subnet::parse("subnet", "10.200.0.0/16").unwrap();
    assert!(s.overlaps("10.200.3.0/24".parse().unwrap()));
    assert!(!s.overlaps("10.201.0.0/24".parse().unwrap()));
}

#[test]
fn states_round_trip() {
    for s in MachineState::ALL {
        assert_eq!(s.as_str().parse::<MachineState>().unwrap(), s);
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
    }
    assert!("runing".parse::<MachineState>().is_err());
}

#[test]
fn cpu_limits_parse_as_thousandths_and_print_back() {
    for (s, m, shown) in [
        ("0.5", 500, "0.5"),
        ("1", 1000, "1"),
        ("1.25", 1250, "1.25"),
        (".1", 100, "0.1"),
        ("2.000", 2000, "2"),
    ] {
        let c: CpuLimit = s.parse().unwrap();
        assert_eq!((c.milli(), c.to_string().as_str()), (m, shown), "{s}");
    }
    for s in [
        "0", "0.0", "-1", "abc", "", ".", "0.0001", "1e3", "nan", "1.5.5", "99999999",
    ] {
        let e = s.parse::<CpuLimit>().unwrap_err().to_string();
        assert!(e.contains("allowed: above 0"), "{s}: {e}");
    }
}
