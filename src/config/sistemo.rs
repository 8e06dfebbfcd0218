//! Sistemo's configuration keys, read into ours, so that a Sistemo `config.yml` starts this
//! daemon with the same meaning. Keys both spell alike pass as they are; the others are renamed.

use super::{Config, ConfigError};
use crate::domain::ByteSize;
use yaml_serde::{Mapping, Value};

/// How a Sistemo value (a whole number) becomes ours.
#[derive(Clone, Copy)]
enum Unit {
    /// Megabytes → a size (`512` → `512M`).
    Mib,
    /// Seconds → milliseconds.
    SecToMs,
    /// The same number.
    Same,
}

/// Sistemo's spelling → ours. Sistemo keys spelled as ours (`bridge_subnet`, `max_vcpus`,
/// `block_smtp`, `host_interface`, `default_bandwidth_mbps`, `default_upload_mbps`,
/// `default_iops`, `default_disk_bw_mbps`, `rate_limit_rps`, `rate_limit_burst`, `port`) need
/// no entry.
const RENAMED: &[(&str, &str, Unit)] = &[
    ("max_memory_mb", "max_memory", Unit::Mib),
    ("max_storage_mb", "max_storage", Unit::Mib),
    ("min_disk_free_mb", "min_disk_free", Unit::Mib),
    ("reconciler_interval_sec", "liveness_interval_ms", Unit::SecToMs),
    ("ssh_timeout_sec", "ready_timeout_sec", Unit::Same),
];

/// Parse a config file's text: Sistemo's spellings become ours (both set and disagreeing is an
/// error naming both), then the whole is read as [`Config`] (an unknown key is an error naming it).
pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    let v: Value = yaml_serde::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
    let v = match v {
        Value::Mapping(m) => Value::Mapping(translate(m)?),
        Value::Null => Value::Mapping(Mapping::new()),
        v => v,
    };
    yaml_serde::from_value(v).map_err(|e| ConfigError(e.to_string()))
}

fn translate(mut m: Mapping) -> Result<Mapping, ConfigError> {
    for &(theirs, ours, unit) in RENAMED {
        let Some(raw) = m.remove(theirs) else { continue };
        let n = raw.as_u64().ok_or_else(|| {
            ConfigError(format!(
                "{theirs}: {} is not a whole number (allowed: 0 or more)",
                show(&raw)
            ))
        })?;
        let value = match unit {
            Unit::Mib => Value::String(format!("{n}M")),
            Unit::SecToMs => Value::Number(n.saturating_mul(1000).into()),
            Unit::Same => Value::Number(n.into()),
        };
        if let Some(existing) = m.get(ours) {
            let same = match unit {
                Unit::Mib => {
                    yaml_serde::from_value::<ByteSize>(existing.clone()).is_ok_and(|b| b == ByteSize::mib(n))
                }
                _ => existing.as_u64() == value.as_u64(),
            };
            if !same {
                return Err(ConfigError(format!(
                    "{theirs}: {n} and {ours}: {} disagree (they are the same setting; allowed: one of them, or both with the same value)",
                    show(existing)
                )));
            }
            continue;
        }
        m.insert(Value::String(ours.into()), value);
    }
    Ok(m)
}

/// A YAML value as it was written, for an error message.
fn show(v: &Value) -> String {
    yaml_serde::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sistemo's README sample.
    const README_SAMPLE: &str = "# All settings are optional\n\
        port: 9090\n\
        bridge_subnet: \"10.50.0.0/16\"  # default: 10.200.0.0/16\n\
        max_vcpus: 8\n\
        default_bandwidth_mbps: 100\n";

    #[test]
    fn sistemo_readme_sample_parses_with_its_meaning() {
        let c = parse(README_SAMPLE).unwrap();
        assert_eq!(c.bridge_subnet.to_string(), "10.50.0.0/16");
        assert_eq!(c.max_vcpus, Some(8));
        assert_eq!(c.default_bandwidth_mbps, 100);
        c.validate().unwrap();
        assert_eq!(c.listeners().unwrap()[0].to_string(), "http://127.0.0.1:9090");
    }

    #[test]
    fn every_sistemo_key_is_read() {
        let c = parse(
            "host_interface: lo\nbridge_subnet: 10.60.0.0/16\nmax_vcpus: 4\nmax_memory_mb: 2048\n\
             max_storage_mb: 10240\nmin_disk_free_mb: 512\ndefault_bandwidth_mbps: 50\n\
             default_upload_mbps: 20\ndefault_iops: 300\ndefault_disk_bw_mbps: 8\n\
             reconciler_interval_sec: 30\nssh_timeout_sec: 20\nblock_smtp: false\n\
             rate_limit_rps: 10\nrate_limit_burst: 20\n",
        )
        .unwrap();
        assert_eq!(
            c.host_interface.as_ref().map(|i| i.to_string()).as_deref(),
            Some("lo")
        );
        assert_eq!(c.max_vcpus, Some(4));
        assert_eq!(c.max_memory, Some(ByteSize::mib(2048)));
        assert_eq!(c.max_storage, ByteSize::mib(10240));
        assert_eq!(c.min_disk_free, ByteSize::mib(512));
        assert_eq!(
            (
                c.default_bandwidth_mbps,
                c.default_upload_mbps,
                c.default_iops,
                c.default_disk_bw_mbps
            ),
            (50, 20, 300, 8)
        );
        assert_eq!(c.liveness_interval_ms, Some(30_000));
        assert_eq!(c.ready_timeout_sec, 20);
        assert!(!c.block_smtp);
        assert_eq!((c.rate_limit_rps, c.rate_limit_burst), (10, 20));
    }

    #[test]
    fn both_spellings_must_agree() {
        let c = parse("max_storage_mb: 2048\nmax_storage: 2G\n").unwrap();
        assert_eq!(c.max_storage, ByteSize::mib(2048));
        let e = parse("max_storage_mb: 1024\nmax_storage: 2G\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_storage_mb: 1024") && e.contains("max_storage: 2G") && e.contains("disagree"),
            "{e}"
        );
        let e = parse("ssh_timeout_sec: 20\nready_timeout_sec: 30\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ssh_timeout_sec") && e.contains("ready_timeout_sec"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let e = parse("max_memory_mb: lots\n").unwrap_err().to_string();
        assert!(e.contains("max_memory_mb") && e.contains("lots"), "{e}");
        let e = parse("default_bandwidth_mbpz: 100\n").unwrap_err().to_string();
        assert!(e.contains("default_bandwidth_mbpz"), "{e}");
        let e = parse("rate_limit_rps: -1\n").unwrap_err().to_string();
        assert!(e.contains("-1"), "{e}");
    }
}
