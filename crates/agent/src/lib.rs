//! sistemo's guest agent and its protocol: exec, interactive shells, file copy, facts and
//! shutdown over a host-only channel (virtio-serial, or vsock), so guests need no sshd.
//!
//! Modules:
//! - [`proto`]: frames and messages, shared by both ends.
//! - [`client`]: the host's end (used by `sistemo-vmm`): handshake, sessions, backpressure.
//! - [`guest`]: the agent's end (the `sistemo-agent` binary): sessions run as processes.
//! - [`port`]: the guest's virtio-serial port as non-blocking async I/O.
//! - [`runner`]: starting a session's process (user, environment, pipes or a PTY).
//! - [`archive`]: tar streams for `machine cp`, used on both ends.
//! - [`facts`]: what the guest reports about itself.
//! - [`early`]: sessions started while the image's init is still starting.
//! - [`identity`]: a restored clone taking its own identity (clock, RNG, addresses, keys).
//! - [`init`]: the agent as PID 1 running an image's single program (OCI images).
//! - `sys` (private): the crate's only `unsafe`.

pub mod archive;
pub mod client;
pub mod early;
pub mod facts;
pub mod guest;
pub mod identity;
pub mod init;
pub mod port;
pub mod proto;
pub mod runner;
mod sys;
