//! sistemo: one binary that turns a Linux host into a host of real microVMs.
//!
//! Data flows one way: [`cli`] → [`client`] → HTTP/JSON ([`api`]) → [`server`] → services
//! ([`machine`], [`networks`], [`images`], wired by [`host`]) → ([`store`], [`net`],
//! `sistemo_vmm`). Nothing lower imports anything higher; [`domain`] and [`spec`] are the
//! vocabulary every layer shares, and [`error`] classifies failures once for all.
//!
//! - [`domain`]: machine states, hypervisor kinds, names, sizes, subnets — parsed once.
//! - [`spec`]: the expose grammar, parsed once at the edge into types.
//! - [`store`]: SQLite, the only code that speaks SQL.
//! - [`net`]: links over netlink, address planning, the nftables firewall.
//! - [`machine`] / [`networks`] / [`images`]: the services, each owning its state and lock.
//! - [`host`]: the services of one daemon, start-up and self-repair.
//! - [`auth`]: users, API tokens, browser sessions; [`events`]: the daemon's event bus.
//! - [`backend`]: the hypervisor backend the configuration names.
//! - [`config`]: daemon configuration (file, environment, flags), read in one place.
//! - [`daemon`]: `sistemo up`: start-up restore, self-repair timer, API listeners.
//! - [`sys`]: the only `unsafe` (TAP ioctls), each block justified.

pub mod api;
pub mod api_images;
pub mod api_volumes;
pub mod api_web;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod error;
pub mod events;
pub mod host;
pub mod images;
pub mod machine;
pub mod net;
pub mod networks;
pub mod server;
pub mod spec;
pub mod store;
pub mod sys;
pub mod tls;
pub mod volumes;

pub use sistemo_vmm::Progress;
