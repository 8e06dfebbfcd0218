//! `sistemo network create|list|delete`: isolated networks, one bridge each.

use super::output::{confirm, print_json, table};
use crate::api::*;
use crate::client::Client;
use anyhow::Result;
use clap::Subcommand;

/// `network` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create an isolated network with its own bridge.
    Create {
        /// Name (a-z, 0-9, '-'; at most 11: its bridge is sis-NAME).
        name: String,
        /// Subnet, e.g. 10.201.0.0/24 (default: a free 10.x.0.0/24).
        #[arg(long)]
        subnet: Option<String>,
    },
    /// List networks.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a network (refused while machines use it).
    #[command(visible_alias = "rm")]
    Delete {
        /// Name of the network to delete.
        name: String,
    },
}

/// Run a `network` subcommand.
pub fn run(c: &Client, cmd: NetworkCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        NetworkCmd::Create { name, subnet } => {
            let n: NetworkInfo = c.call(
                "POST",
                "/v1/networks",
                Some(&NetworkCreateRequest { name, subnet }),
            )?;
            if json {
                print_json(&n)?;
            } else {
                println!("network {} created: {} on bridge {}", n.name, n.subnet, n.bridge);
            }
        }
        NetworkCmd::List => {
            let ns: Vec<NetworkInfo> = c.get("/v1/networks")?;
            if json {
                print_json(&ns)?;
            } else {
                table(
                    &["NAME", "SUBNET", "GATEWAY", "BRIDGE", "MACHINES"],
                    ns.into_iter()
                        .map(|n| vec![n.name, n.subnet, n.gateway, n.bridge, n.machines.to_string()])
                        .collect(),
                );
            }
        }
        NetworkCmd::Delete { name } => {
            confirm(yes, &format!("delete network {name}"))?;
            let v: serde_json::Value = c.call(
                "DELETE",
                &format!("/v1/networks/{}", super::urlencode(&name)),
                None::<&()>,
            )?;
            if json {
                print_json(&v)?;
            } else {
                println!("network {name} deleted");
            }
        }
    }
    Ok(())
}
