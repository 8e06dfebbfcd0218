//! `sistemo image list|build|prepare|rm`: local images; `prepare` fills a data dir without a
//! daemon (boot assets and the `debian` image).

use super::output::{confirm, print_json, progress_printer, table};
use super::urlencode;
use crate::api::*;
use crate::client::Client;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List local images.
    #[command(visible_alias = "ls")]
    List,
    /// Build an image from Debian's archive with debootstrap.
    #[command(
        after_help = "Examples:\n  sistemo image build debian\n  sistemo image build debian --name web-image --include nginx,nodejs"
    )]
    Build {
        /// Base (debian).
        base: String,
        /// Tag of the new image (default: the base's name).
        #[arg(long)]
        name: Option<String>,
        /// Extra packages, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Prepare kernel, initramfs and the `debian` image in a data dir without a daemon (root;
    /// fetches from Debian's archive, changes nothing in the host's network).
    Prepare {
        /// Data dir to fill (the daemon's `data_dir`).
        #[arg(long, default_value = "/var/lib/sistemo")]
        data_dir: PathBuf,
        /// Extra packages baked into the `debian` image, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Remove an image tag (refused while a machine uses it).
    #[command(visible_alias = "rm")]
    Remove {
        /// Tag to remove (the image goes when no tag is left).
        tag: String,
    },
}

/// Run an `image` subcommand.
pub async fn run(c: &Client, cmd: ImageCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        ImageCmd::List => {
            let is: Vec<ImageRow> = c.get("/v1/images")?;
            if json {
                print_json(&is)?;
            } else {
                table(
                    &["TAGS", "SHA256", "SIZE", "USED BY", "SOURCE"],
                    is.into_iter()
                        .map(|i| {
                            vec![
                                i.tags.join(","),
                                i.sha256[..12.min(i.sha256.len())].to_string(),
                                format!("{}M", i.size >> 20),
                                if i.used_by.is_empty() {
                                    "-".into()
                                } else {
                                    i.used_by.join(",")
                                },
                                i.source,
                            ]
                        })
                        .collect(),
                );
            }
        }
        ImageCmd::Build { base, name, include } => {
            let r: ImageRow = c.stream(
                "POST",
                "/v1/images/build",
                Some(&ImageBuildRequest { base, name, include }),
                progress_printer(),
            )?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "image {} built: sha256 {}, {}M",
                    r.tags.join(","),
                    r.sha256,
                    r.size >> 20
                );
            }
        }
        ImageCmd::Prepare { data_dir, include } => {
            crate::backend::prepare(&crate::config::Config::load(None)?, &data_dir, &include).await?
        }
        ImageCmd::Remove { tag } => {
            confirm(yes, &format!("remove image {tag}"))?;
            let v: serde_json::Value =
                c.call("DELETE", &format!("/v1/images/{}", urlencode(&tag)), None::<&()>)?;
            if json {
                print_json(&v)?;
            } else {
                println!("image {tag} removed");
            }
        }
    }
    Ok(())
}
