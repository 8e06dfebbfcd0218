//! `sistemo service install|uninstall|status`: a systemd unit that runs `sistemo up`, restarts
//! on failure, starts after the network and nftables, and re-applies rules on nftables reloads.

use anyhow::{Context, Result, bail};
use std::path::Path;

/// Where the unit is written.
pub const UNIT_PATH: &str = "/etc/systemd/system/sistemo.service";

/// The unit text for the binary at `exe`.
pub fn unit(exe: &Path) -> String {
    format!(
        "[Unit]
Description=sistemo microVM host daemon
Documentation=https://github.com/sistemo
After=network-online.target nftables.service
Wants=network-online.target
# A reload of nftables (or firewalld) flushes the ruleset: restart with it so the rules are
# re-applied at once (the daemon also repairs its table within a second on its own).
PartOf=nftables.service

[Service]
Type=simple
ExecStart={} up
Restart=on-failure
RestartSec=2
# Machines are separate processes in their own sessions: stopping the daemon leaves them running.
KillMode=process

[Install]
WantedBy=multi-user.target
",
        exe.display()
    )
}

fn systemctl(args: &[&str]) -> Result<()> {
    let st = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl (is systemd installed?)")?;
    if !st.success() {
        bail!("systemctl {} failed with {st}", args.join(" "));
    }
    Ok(())
}

/// Create the group whose members may use the API socket without sudo (as the `docker`
/// group's do), unless it exists (`service install` and `install`).
pub(super) fn ensure_socket_group() -> Result<()> {
    let g = crate::daemon::SOCKET_GROUP;
    if nix::unistd::Group::from_name(g).ok().flatten().is_some() {
        return Ok(());
    }
    let st = std::process::Command::new("groupadd")
        .args(["--system", g])
        .status()
        .context("running groupadd")?;
    if !st.success() {
        bail!("groupadd --system {g} failed with {st}");
    }
    println!("created group {g}: its members use sistemo without sudo (sudo usermod -aG {g} USER)");
    Ok(())
}

/// Install and start the unit.
pub fn install() -> Result<()> {
    let exe = std::env::current_exe()?;
    ensure_socket_group()?;
    std::fs::write(UNIT_PATH, unit(&exe)).with_context(|| format!("writing {UNIT_PATH} (run as root)"))?;
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "--now", "sistemo.service"])?;
    println!("installed {UNIT_PATH} and started sistemo.service");
    Ok(())
}

/// Stop and remove the unit (machines keep running), then take sistemo's rules out of other
/// tools' chains itself: a daemon that did not stop cleanly (killed, failed, timed out) left them.
pub fn uninstall() -> Result<()> {
    if !Path::new(UNIT_PATH).exists() {
        bail!("{UNIT_PATH} does not exist: the service is not installed");
    }
    let _ = systemctl(&["disable", "--now", "sistemo.service"]);
    std::fs::remove_file(UNIT_PATH)?;
    systemctl(&["daemon-reload"])?;
    println!("removed {UNIT_PATH}");
    let cfg = crate::config::Config::load(None)?;
    remove_foreign_rules(cfg.nft_table.as_str())?;
    Ok(())
}

/// Remove the rules tagged `sistemo:<table>` from foreign `policy drop` forward chains (the
/// forward-compat rules); sistemo's own tables stay.
pub fn remove_foreign_rules(table: &str) -> Result<()> {
    use crate::net::firewall::FirewallDriver as _;
    crate::net::firewall::nftables::Nftables::new(table, Default::default())
        .remove_forward_compat()
        .with_context(|| format!("removing sistemo's rules (sistemo:{table}) from foreign forward chains"))
}

/// Print the unit's status; exit code as `systemctl status`.
pub fn status() -> Result<i32> {
    if !Path::new(UNIT_PATH).exists() {
        println!("sistemo.service is not installed (sistemo service install)");
        return Ok(3);
    }
    let st = std::process::Command::new("systemctl")
        .args(["status", "--no-pager", "sistemo.service"])
        .status()?;
    Ok(st.code().unwrap_or(1))
}

/// The daemon's log from the journal (`journalctl -u sistemo.service`); its exit code.
pub fn logs(follow: bool) -> Result<i32> {
    let mut cmd = std::process::Command::new("journalctl");
    cmd.args(["--no-pager", "-u", "sistemo.service"]);
    if follow {
        cmd.arg("--follow");
    }
    let st = cmd
        .status()
        .context("running journalctl (is systemd's journal on this host?)")?;
    Ok(st.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    /// What `service uninstall` leaves of sistemo's compat rules in a foreign chain: nothing,
    /// and the foreign chain's own rules stay (in a private network namespace).
    #[test]
    #[ignore = "needs root and network namespaces: run sudo scripts/test"]
    fn uninstall_removes_compat_rules_from_foreign_chains() {
        use crate::net::firewall::netlink::tests::{in_private_netns, nft};
        use crate::net::firewall::{BridgeNet, FirewallDriver as _, nftables::Nftables};
        in_private_netns(|| {
            nft(
                "table ip filter { chain FORWARD { type filter hook forward priority 0; policy drop; iifname \"docker0\" accept; }; }",
            );
            let list = || {
                let o = std::process::Command::new("nft")
                    .args(["list", "chain", "ip", "filter", "FORWARD"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            let bridges = [BridgeNet {
                bridge: "br0".into(),
                subnet: "10.200.0.0/16".parse().unwrap(),
            }];
            let fw = Nftables::new("t", Default::default());
            assert_eq!(fw.ensure_forward_compat(&bridges).unwrap().len(), 1);
            // control: the rules are there, and another table's are not ours
            assert_eq!(list().matches("sistemo:t ").count(), 3, "{}", list());
            super::remove_foreign_rules("u").unwrap();
            assert_eq!(
                list().matches("sistemo:t ").count(),
                3,
                "another table's rules removed"
            );
            super::remove_foreign_rules("t").unwrap();
            let after = list();
            assert!(!after.contains("sistemo:"), "compat rules left: {after}");
            assert!(
                after.contains("iifname \"docker0\" accept"),
                "foreign rule kept: {after}"
            );
        });
    }
}
