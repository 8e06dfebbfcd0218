//! `sistemo image list|build|pull|import|warm|prepare|rm|prune`: local images and their templates;
//! `prepare` fills a data dir without a daemon (boot assets and the `debian` image).

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
    /// Build an image from Debian's archive with debootstrap, or pull an OCI image and tag it
    /// with its repository's last component (`node:20` → `node`).
    #[command(
        after_help = "Examples:\n  sistemo image build debian\n  sistemo image build debian --name web-image --include nginx,nodejs\n  sistemo image build node:20          # then: sistemo machine deploy node --name api"
    )]
    Build {
        /// Base: debian, or an OCI image reference.
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
    /// Pull an OCI image from a registry (Docker Hub by default) and convert it.
    #[command(
        after_help = "Examples:\n  sistemo image pull nginx\n  sistemo image pull ghcr.io/org/app:1.2 --name app\n  sistemo image pull 127.0.0.1:5000/web@sha256:<digest>\n  sistemo image pull ghcr.io/org/private:1 --docker-config"
    )]
    Pull {
        /// Reference: [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST].
        reference: String,
        /// An extra local tag.
        #[arg(long)]
        name: Option<String>,
        /// Use the registry's credentials from a Docker config.json (default
        /// ~/.docker/config.json) for this pull only; `auths` entries only, no credential helpers.
        #[arg(long, value_name = "PATH", num_args = 0..=1)]
        docker_config: Option<Option<PathBuf>>,
    },
    /// Import a `docker save` archive or an OCI image layout (directory or tar).
    #[command(
        after_help = "Examples:\n  sistemo image import ./app.tar\n  sistemo image import ./layout-dir --name app"
    )]
    Import {
        /// The archive or layout directory (read by the daemon; with --host an archive is
        /// uploaded).
        file: PathBuf,
        /// Tag (default: the names the archive carries).
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a template of an image for a machine shape: new deploys of that image and shape
    /// start from it in a fraction of a second instead of booting (`deploy --cold` boots).
    #[command(
        after_help = "Examples:\n  sistemo image warm debian\n  sistemo image warm debian --memory 1G --vcpus 2"
    )]
    Warm {
        /// The image (a tag or an OCI reference).
        image: String,
        /// Memory of the machines it starts, e.g. 512M.
        #[arg(long)]
        memory: Option<String>,
        /// vCPUs of the machines it starts.
        #[arg(long)]
        vcpus: Option<u32>,
    },
    /// Remove cached layers no image uses, and templates that can no longer be used.
    Prune,
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
                let templates: Vec<TemplateRow> = is.iter().flat_map(|i| i.templates.clone()).collect();
                table(
                    &["NAME", "DIGEST", "SIZE", "CREATED", "USED BY", "SOURCE"],
                    is.into_iter()
                        .map(|i| {
                            let (digest, created) = match &i.oci {
                                Some(o) => (
                                    o.digest.chars().take(19).collect(),
                                    o.created
                                        .as_deref()
                                        .map_or("-".into(), |c| c.chars().take(19).collect()),
                                ),
                                None => (i.sha256[..12.min(i.sha256.len())].to_string(), "-".into()),
                            };
                            vec![
                                i.tags.join(","),
                                digest,
                                format!("{}M", i.size >> 20),
                                created,
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
                if !templates.is_empty() {
                    println!();
                    table(
                        &["TEMPLATE", "IMAGE", "VCPUS", "MEMORY", "SIZE", "CREATED"],
                        templates
                            .into_iter()
                            .map(|t| {
                                vec![
                                    t.key[..12].to_string(),
                                    t.image,
                                    t.vcpus.to_string(),
                                    crate::domain::ByteSize::mib(t.memory_mib).to_string(),
                                    format!("{}M", t.bytes >> 20),
                                    t.created_at,
                                ]
                            })
                            .collect(),
                    );
                }
            }
        }
        ImageCmd::Build { base, name, include } => {
            let r: ImageRow = c.stream(
                "POST",
                "/v1/images/build",
                Some(&ImageBuildRequest { base, name, include }),
                progress_printer(),
            )?;
            print_image(&r, json)?;
        }
        ImageCmd::Pull {
            reference,
            name,
            docker_config,
        } => {
            let credentials = match docker_config {
                Some(path) => super::docker_config::credentials(&reference, path)?,
                None => None,
            };
            let r: ImageRow = c.stream(
                "POST",
                "/v1/images/pull",
                Some(&ImagePullRequest {
                    reference,
                    name,
                    credentials,
                }),
                progress_printer(),
            )?;
            print_image(&r, json)?;
        }
        ImageCmd::Import { file, name } if c.is_remote() => {
            let r = super::upload::import(c, &file, name.as_deref())?;
            print_image(&r, json)?;
        }
        ImageCmd::Import { file, name } => {
            let path = std::path::absolute(&file)?
                .to_str()
                .ok_or_else(|| anyhow::anyhow!("path {} is not UTF-8", file.display()))?
                .to_string();
            let r: ImageRow = c.stream(
                "POST",
                "/v1/images/import",
                Some(&ImageImportRequest { path, name }),
                progress_printer(),
            )?;
            print_image(&r, json)?;
        }
        ImageCmd::Warm { image, memory, vcpus } => {
            let t: TemplateRow = c.stream(
                "POST",
                "/v1/images/warm",
                Some(&ImageWarmRequest { image, vcpus, memory }),
                progress_printer(),
            )?;
            if json {
                print_json(&t)?;
            } else {
                println!(
                    "template {} of {}: {} vCPU, {}, {} on disk",
                    &t.key[..12],
                    t.image,
                    t.vcpus,
                    crate::domain::ByteSize::mib(t.memory_mib),
                    crate::domain::ByteSize::mib(t.bytes >> 20)
                );
            }
        }
        ImageCmd::Prune => {
            let v: serde_json::Value = c.call("POST", "/v1/images/prune", None::<&()>)?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{} MiB of unused layers removed",
                    v["freed_bytes"].as_u64().unwrap_or(0) >> 20
                );
                let n = v["templates_removed"].as_array().map_or(0, Vec::len);
                if n > 0 {
                    println!("{n} template(s) that can no longer be used removed");
                }
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
                match v["templates_removed"].as_array().map_or(0, Vec::len) {
                    0 => println!("image {tag} removed"),
                    n => println!("image {tag} removed, with its {n} template(s)"),
                }
            }
        }
    }
    Ok(())
}

/// One image built, pulled or imported.
fn print_image(r: &ImageRow, json: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    println!(
        "image {}: sha256 {}, {}M",
        r.tags.join(","),
        r.sha256,
        r.size >> 20
    );
    if let Some(o) = &r.oci {
        println!("digest:  {}", o.digest);
        if !o.command.is_empty() {
            println!("command: {}", o.command.join(" "));
        }
        if !o.exposed_ports.is_empty() {
            println!(
                "exposes: {} (publish with `machine deploy --expose HOST:PORT`)",
                o.exposed_ports.join(", ")
            );
        }
    }
    Ok(())
}
