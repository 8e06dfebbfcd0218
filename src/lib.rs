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
#![deny(missing_docs)]

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
