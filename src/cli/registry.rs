//! `sistemo registry login HOST`: credentials for pulling from an OCI registry, kept by the
//! daemon root-only (0600) in its data dir.

use super::output::print_json;
use crate::api::*;
use crate::client::Client;
use anyhow::{Result, bail};
use clap::Subcommand;
use std::io::Read;

/// `registry` subcommands.
#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Store credentials for a registry (used by `image pull` and `machine deploy REF`).
    #[command(
        after_help = "Examples:\n  echo \"$TOKEN\" | sistemo registry login ghcr.io --username me --password-stdin\n  sistemo registry login 127.0.0.1:5000 -u admin --password-stdin < pass.txt"
    )]
    Login {
        /// Registry as written in image references: HOST or HOST:PORT.
        registry: String,
        /// User name.
        #[arg(short, long)]
        username: String,
        /// Read the password (or token) from stdin.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

/// Run a `registry` subcommand.
pub fn run(c: &Client, cmd: RegistryCmd, json: bool) -> Result<()> {
    match cmd {
        RegistryCmd::Login {
            registry,
            username,
            password_stdin: _,
        } => {
            let mut password = String::new();
            std::io::stdin().read_to_string(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                bail!("no password on stdin (allowed: a non-empty password or token)");
            }
            let v: serde_json::Value = c.call(
                "POST",
                "/v1/registries/login",
                Some(&RegistryLoginRequest {
                    registry: registry.clone(),
                    username,
                    password,
                }),
            )?;
            if json {
                print_json(&v)?;
            } else {
                println!("credentials for {registry} stored");
            }
        }
    }
    Ok(())
}
