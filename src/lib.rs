//! sistemo: one binary that turns a Linux host into a host of real microVMs.
//!
//! Data flows one way: [`cli`] → HTTP/JSON over a Unix socket ([`api`], [`client`]) →
//! [`server`] → [`machine`] manager → ([`store`], [`net`], `sistemo_vmm`).
//!
//! - [`spec`]: the expose grammar, parsed once at the edge into types.
//! - [`store`]: SQLite, the only code that speaks SQL.
//! - [`net`]: bridges, TAPs and addresses over netlink; the nftables firewall.
//! - [`machine`]: the machine state machine, each host-touching step with its undo.
//! - [`config`]: daemon configuration (file, flags, environment).
//! - [`daemon`]: `sistemo up`: start-up restore, self-repair timer, API listeners.
//! - [`server`] / [`client`] / [`api`]: the HTTP/JSON API, its client, and their shared types.
//! - [`cli`]: the command line; [`doctor`] and [`service`] are two of its commands.
//! - [`vm`]: glue to the QEMU backend and the image store of `sistemo_vmm`.
//! - [`sys`]: the only `unsafe` (TAP ioctls), each block justified.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod machine;
pub mod net;
pub mod server;
pub mod service;
pub mod spec;
pub mod store;
pub mod sys;
pub mod vm;
