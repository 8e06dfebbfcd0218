//! `sistemo volume …` (create, list, show, resize, snapshot, clone, delete) and the machine
//! side: `machine volume attach|detach|list`, `machine snapshot`, `machine clone`.

use super::output::{confirm, format_status, print_json, progress_printer, table};
use super::{Usage, urlencode};
use crate::api::*;
use crate::client::Client;
use crate::domain::{ByteSize, VolumeName};
use anyhow::Result;
use clap::Subcommand;

/// `volume` subcommands.
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a sparse volume (ext4 made without mounting anything, or raw).
    #[command(
        visible_alias = "add",
        after_help = "Examples:\n  sistemo volume create 5G --name pgdata\n  sistemo volume create 1G --format raw"
    )]
    Create {
        /// Size, e.g. 5G, 512M (within max_storage).
        #[arg(allow_hyphen_values = true)]
        size: String,
        /// Name (a-z, 0-9, '-'; default: generated).
        #[arg(long)]
        name: Option<String>,
        /// ext4 (default) or raw.
        #[arg(long, value_parser = ["ext4", "raw"], default_value = "ext4")]
        format: String,
    },
    /// List volumes and snapshots.
    #[command(visible_alias = "ls")]
    List,
    /// Show a volume or snapshot.
    #[command(visible_aliases = ["get", "info"])]
    Show {
        /// Name or ID.
        name: String,
    },
    /// Grow a volume and its file system (machines using it must be stopped).
    Resize {
        /// Name or ID.
        name: String,
        /// New size, larger than the current one.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Snapshot a volume (instant with reflinks, else a sparse copy).
    Snapshot {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// Clone a snapshot or a volume into a new volume.
    Clone {
        /// The snapshot or volume to copy.
        from: String,
        /// The new volume's name.
        name: String,
    },
    /// Delete a volume or snapshot and its data (refused while attached).
    #[command(visible_aliases = ["rm", "remove"])]
    Delete {
        /// Name or ID.
        name: String,
    },
}

/// `machine volume` subcommands.
#[derive(Debug, Subcommand)]
pub enum MachineVolumeCmd {
    /// Attach a volume to a stopped machine (hot-plug is not implemented).
    #[command(after_help = "Examples:\n  sistemo machine volume attach db pgdata --mount /data")]
    Attach {
        /// The machine.
        machine: String,
        /// The volume.
        volume: String,
        /// Where the guest mounts it at boot (ext4 volumes), e.g. /data.
        #[arg(long)]
        mount: Option<String>,
        /// Attach read-only (several machines may share it).
        #[arg(long)]
        readonly: bool,
    },
    /// Detach a volume from a stopped machine.
    Detach {
        /// The machine.
        machine: String,
        /// The volume.
        volume: String,
    },
    /// List a machine's volumes.
    #[command(visible_alias = "ls")]
    List {
        /// The machine.
        machine: String,
    },
}

fn check_size(s: &str) -> Result<()> {
    ByteSize::parse("size", s).map_err(Usage::new)?;
    Ok(())
}

fn check_name(s: &str) -> Result<()> {
    s.parse::<VolumeName>().map_err(Usage::new)?;
    Ok(())
}

fn show(v: &VolumeInfo, json: bool) -> Result<()> {
    if json {
        return print_json(v);
    }
    let attached = if v.attached_to.is_empty() {
        "none".to_string()
    } else {
        v.attached_to.iter().map(describe).collect::<Vec<_>>().join(", ")
    };
    println!(
        "ID:       {}\nName:     {}\nKind:     {}\nFormat:   {}\nSize:     {}\nAttached: {attached}\nSource:   {}\nPath:     {}\nCreated:  {}",
        v.id,
        v.name,
        v.kind,
        v.format,
        ByteSize::bytes(v.size_bytes),
        v.source.as_deref().unwrap_or("-"),
        v.path,
        v.created_at
    );
    Ok(())
}

/// `machine (mount, ro)` as one short phrase.
pub fn describe(a: &VolumeAttachmentInfo) -> String {
    let mut s = a.machine.clone();
    let mut how = vec![];
    if a.root {
        how.push("root".to_string());
    }
    if let Some(m) = &a.mount {
        how.push(m.clone());
    }
    if a.readonly {
        how.push("ro".into());
    }
    if !how.is_empty() {
        s.push_str(&format!(" ({})", how.join(", ")));
    }
    s
}

/// Run a `volume` subcommand.
pub fn run(c: &Client, cmd: VolumeCmd, json: bool, yes: bool) -> Result<()> {
    let path = |n: &str| format!("/v1/volumes/{}", urlencode(n));
    match cmd {
        VolumeCmd::Create { size, name, format } => {
            check_size(&size)?;
            if let Some(n) = &name {
                check_name(n)?;
            }
            let req = VolumeCreateRequest {
                size,
                name,
                format: Some(format),
            };
            let v: VolumeInfo = c.stream("POST", "/v1/volumes", Some(&req), progress_printer())?;
            show(&v, json)?;
        }
        VolumeCmd::List => {
            let vs: Vec<VolumeInfo> = c.get("/v1/volumes")?;
            if json {
                print_json(&vs)?;
            } else {
                table(
                    &["NAME", "KIND", "FORMAT", "SIZE", "ATTACHED TO", "SOURCE"],
                    vs.into_iter()
                        .map(|v| {
                            vec![
                                v.name,
                                v.kind,
                                v.format,
                                ByteSize::bytes(v.size_bytes).to_string(),
                                v.attached_to.iter().map(describe).collect::<Vec<_>>().join(", "),
                                v.source.unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        VolumeCmd::Show { name } => show(&c.get(&path(&name))?, json)?,
        VolumeCmd::Resize { name, size } => {
            check_size(&size)?;
            let v: VolumeInfo = c.stream(
                "POST",
                &format!("{}/resize", path(&name)),
                Some(&VolumeResizeRequest { size }),
                progress_printer(),
            )?;
            show(&v, json)?;
        }
        VolumeCmd::Snapshot { volume, snapshot } => {
            check_name(&snapshot)?;
            let v: VolumeInfo = c.stream(
                "POST",
                &format!("{}/snapshot", path(&volume)),
                Some(&NameRequest { name: Some(snapshot) }),
                progress_printer(),
            )?;
            show(&v, json)?;
        }
        VolumeCmd::Clone { from, name } => {
            check_name(&name)?;
            let v: VolumeInfo = c.stream(
                "POST",
                &format!("{}/clone", path(&from)),
                Some(&NameRequest { name: Some(name) }),
                progress_printer(),
            )?;
            show(&v, json)?;
        }
        VolumeCmd::Delete { name } => {
            // Fail on an unknown volume before asking.
            let v: VolumeInfo = c.get(&path(&name))?;
            confirm(
                yes,
                &format!(
                    "delete {} {name} and its data ({})",
                    v.kind,
                    ByteSize::bytes(v.size_bytes)
                ),
            )?;
            let r: serde_json::Value = c.call("DELETE", &path(&name), None::<&()>)?;
            if json {
                print_json(&r)?;
            } else {
                println!("{} {name} deleted", v.kind);
            }
        }
    }
    Ok(())
}

/// Run a `machine volume` subcommand.
pub fn run_machine(c: &Client, cmd: MachineVolumeCmd, json: bool) -> Result<()> {
    let path = |n: &str| format!("/v1/machines/{}/volumes", urlencode(n));
    let shown = |m: &MachineInfo| -> Result<()> {
        if json {
            print_json(m)
        } else {
            print!("{}", format_status(m));
            Ok(())
        }
    };
    match cmd {
        MachineVolumeCmd::Attach {
            machine,
            volume,
            mount,
            readonly,
        } => {
            check_name(&volume)?;
            let m: MachineInfo = c.call(
                "POST",
                &path(&machine),
                Some(&AttachRequest {
                    volume,
                    mount,
                    readonly,
                }),
            )?;
            shown(&m)?;
        }
        MachineVolumeCmd::Detach { machine, volume } => {
            let m: MachineInfo = c.call(
                "DELETE",
                &format!("{}/{}", path(&machine), urlencode(&volume)),
                None::<&()>,
            )?;
            shown(&m)?;
        }
        MachineVolumeCmd::List { machine } => {
            let vs: Vec<VolumeAttachmentInfo> = c.get(&path(&machine))?;
            if json {
                print_json(&vs)?;
            } else {
                table(
                    &["VOLUME", "MOUNT", "MODE", "ROOT"],
                    vs.into_iter()
                        .map(|a| {
                            vec![
                                a.volume,
                                a.mount.unwrap_or_else(|| "-".into()),
                                if a.readonly { "ro" } else { "rw" }.into(),
                                if a.root { "yes" } else { "no" }.into(),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

/// `machine snapshot NAME [SNAP]`.
pub fn machine_snapshot(c: &Client, machine: &str, name: Option<String>, json: bool) -> Result<()> {
    if let Some(n) = &name {
        check_name(n)?;
    }
    let vs: Vec<VolumeInfo> = c.stream(
        "POST",
        &format!("/v1/machines/{}/snapshot", urlencode(machine)),
        Some(&NameRequest { name }),
        progress_printer(),
    )?;
    if json {
        return print_json(&vs);
    }
    for v in vs {
        println!("snapshot {} made ({})", v.name, ByteSize::bytes(v.size_bytes));
    }
    Ok(())
}

/// `machine clone NAME NEW`.
pub fn machine_clone(c: &Client, machine: &str, new: String, json: bool) -> Result<()> {
    new.parse::<crate::domain::MachineName>().map_err(Usage::new)?;
    let m: MachineInfo = c.stream(
        "POST",
        &format!("/v1/machines/{}/clone", urlencode(machine)),
        Some(&NameRequest { name: Some(new) }),
        progress_printer(),
    )?;
    if json {
        print_json(&m)
    } else {
        print!("{}", format_status(&m));
        Ok(())
    }
}
