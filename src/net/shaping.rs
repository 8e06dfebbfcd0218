//! Network rate limits of a machine on its host-side link (TAP or veth), with `tc`: a token
//! bucket (tbf) on the link's egress shapes what the machine receives (its download); what it
//! sends (its upload) is redirected from the link's ingress to a companion `ifb` link, shaped
//! there the same way (shaping, not policing: a TCP flow reaches the rate instead of stalling
//! on drops, and no `act_police` is needed).

use super::link::{LinkError, Links};
use sistemo_vmm::IoLimits;

/// `tc`, from iproute2.
const TC: &str = "tc";
/// How long a packet may wait in a shaper before it is dropped.
const LATENCY_MS: u32 = 50;
/// Smallest bucket: a GSO packet (64 KiB) must pass whole.
const MIN_BURST: u64 = 64 << 10;

/// The `ifb` link carrying the upload of the machine whose link is `link` (`sm…` → `sb…`).
pub fn ifb_of(link: &str) -> String {
    format!("sb{}", link.strip_prefix("sm").unwrap_or(link))
}

/// Bytes a bucket holds for `mbps`: 20 ms worth, at least [`MIN_BURST`].
fn burst(mbps: u32) -> u64 {
    (u64::from(mbps) * 1_000_000 / 8 / 50).max(MIN_BURST)
}

fn tbf(dev: &str, mbps: u32) -> String {
    format!(
        "qdisc replace dev {dev} root handle 1: tbf rate {mbps}mbit burst {} latency {LATENCY_MS}ms",
        burst(mbps)
    )
}

/// The `tc` invocations that put `io`'s network limits on `link` (the upload's `ifb` exists by
/// then); empty when unlimited.
pub fn commands(link: &str, io: &IoLimits) -> Vec<Vec<String>> {
    let mut c = Vec::new();
    if io.download_mbps > 0 {
        c.push(tbf(link, io.download_mbps));
    }
    if io.upload_mbps > 0 {
        let ifb = ifb_of(link);
        c.push(tbf(&ifb, io.upload_mbps));
        c.push(format!("qdisc replace dev {link} handle ffff: ingress"));
        c.push(format!(
            // With its handle named, a second replace replaces instead of adding a filter.
            "filter replace dev {link} parent ffff: protocol all prio 1 handle 800::800 u32 match u32 0 0 action mirred egress redirect dev {ifb}"
        ));
    }
    c.into_iter()
        .map(|s| s.split_whitespace().map(String::from).collect())
        .collect()
}

async fn tc(args: &[String]) -> Result<(), LinkError> {
    let what = format!("{TC} {}", args.join(" "));
    let out = tokio::process::Command::new(TC)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| LinkError::Io {
            what: what.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LinkError::Io {
            what,
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        })
    }
}

/// Put `io`'s network limits on the machine link `link`. Idempotent; the qdiscs live and die
/// with the links ([`remove`] deletes the `ifb`).
pub async fn apply(links: &Links, link: &str, io: &IoLimits) -> Result<(), LinkError> {
    if io.upload_mbps > 0 {
        links.ensure_ifb(&ifb_of(link)).await?;
    }
    for args in commands(link, io) {
        tc(&args).await?;
    }
    Ok(())
}

/// Remove what [`apply`] added beside the machine's link (its `ifb`); absent is fine.
pub async fn remove(links: &Links, link: &str) -> Result<(), LinkError> {
    let ifb = ifb_of(link);
    match links.lookup(&ifb).await? {
        Some((_, Some(rtnetlink::packet_route::link::InfoKind::Ifb))) => links.delete(&ifb).await,
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_is_no_command_and_limits_are_two_shapers() {
        assert!(commands("sm1", &IoLimits::default()).is_empty());
        let io = IoLimits {
            download_mbps: 100,
            upload_mbps: 8,
            ..Default::default()
        };
        let c: Vec<String> = commands("sm1", &io).iter().map(|a| a.join(" ")).collect();
        assert_eq!(
            c,
            [
                "qdisc replace dev sm1 root handle 1: tbf rate 100mbit burst 250000 latency 50ms",
                "qdisc replace dev sb1 root handle 1: tbf rate 8mbit burst 65536 latency 50ms",
                "qdisc replace dev sm1 handle ffff: ingress",
                "filter replace dev sm1 parent ffff: protocol all prio 1 handle 800::800 u32 match u32 0 0 action mirred egress redirect dev sb1",
            ]
        );
        // Disk limits are the VMM's business.
        let disk = IoLimits {
            iops: 5,
            ..Default::default()
        };
        assert!(commands("sm1", &disk).is_empty());
        assert_eq!(ifb_of("sm0123456789"), "sb0123456789");
    }
}
