//! The wire protocol between sistemo (host) and its guest agent: length-prefixed frames, each
//! tagged with a session, carrying JSON control messages or raw bytes; many sessions share one
//! channel, and per-session credit windows give every stream backpressure of its own.
//!
//! A frame is `len: u32 BE` (of what follows), `kind: u8`, `session: u32 BE`, then the payload.
//! Session 0 is the channel itself (hello, shutdown); the host numbers the others.
//!
//! A connection starts with the host's [`HostMsg::Hello`]; the agent kills whatever ran for an
//! earlier connection and answers with [`RESYNC`] followed by its own hello echoing the nonce.
//! The host discards bytes until it sees that marker, so the tail of a frame the agent had
//! half-written to a previous connection never desynchronises the new one.

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// Protocol version; the host refuses an agent speaking another.
pub const VERSION: u32 = 1;

/// The virtio-serial port name the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "sistemo.agent";

/// The vsock port the agent listens on where the VMM offers virtio-vsock.
pub const VSOCK_PORT: u32 = 1024;

/// Largest payload of one data frame.
pub const CHUNK: usize = 64 << 10;

/// Largest frame accepted (a data chunk, or a control message).
pub const MAX_FRAME: usize = 1 << 20;

/// Bytes of output (or input) a session may have in flight before its reader grants more.
pub const WINDOW: u32 = 1 << 20;

/// Written by the agent before its hello: the host skips everything up to and including it.
pub const RESYNC: &[u8] = b"\0\0SISTEMO-AGENT-RESYNC\0\0";

/// Session 0: messages about the channel itself.
pub const CHANNEL: u32 = 0;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A JSON [`HostMsg`] or [`GuestMsg`].
    Control = 1,
    /// Bytes for the session's standard input (host to guest).
    Stdin = 2,
    /// Bytes from the session's standard output (or its PTY, or an archive).
    Stdout = 3,
    /// Bytes from the session's standard error.
    Stderr = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Control,
            2 => Kind::Stdin,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: Kind,
    /// The session it belongs to.
    pub session: u32,
    /// Raw bytes or a JSON message.
    pub payload: bytes::Bytes,
}

impl Frame {
    /// A control frame holding `msg` as JSON.
    pub fn control<M: Serialize>(session: u32, msg: &M) -> Frame {
        Frame {
            kind: Kind::Control,
            session,
            payload: serde_json::to_vec(msg).expect("messages serialize").into(),
        }
    }

    /// A data frame.
    pub fn data(kind: Kind, session: u32, bytes: impl Into<bytes::Bytes>) -> Frame {
        Frame {
            kind,
            session,
            payload: bytes.into(),
        }
    }

    /// The control message in this frame.
    pub fn message<M: for<'de> Deserialize<'de>>(&self) -> Result<M, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtoError::BadMessage(e.to_string()))
    }
}

/// Bytes of a frame's header (length, kind, session).
pub const HEADER: usize = 4 + 1 + 4;

/// Write the header of a data frame of `kind` for `session` carrying `len` bytes into `dst`
/// (which must be [`HEADER`] long): lets a reader put the payload right after it, unencoded.
pub fn data_header(dst: &mut [u8], kind: Kind, session: u32, len: usize) {
    dst[..4].copy_from_slice(&((5 + len) as u32).to_be_bytes());
    dst[4] = kind as u8;
    dst[5..9].copy_from_slice(&session.to_be_bytes());
}

/// Why the channel cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The transport failed.
    #[error("agent channel: {0}")]
    Io(#[from] std::io::Error),
    /// A frame longer than [`MAX_FRAME`] or shorter than its header.
    #[error("agent channel: bad frame length {0}")]
    BadLength(usize),
    /// An unknown frame kind.
    #[error("agent channel: unknown frame kind {0}")]
    BadKind(u8),
    /// A control message that does not parse.
    #[error("agent channel: bad message: {0}")]
    BadMessage(String),
}

/// The frame codec (for `tokio_util::codec::{FramedRead, FramedWrite}`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Codec;

impl tokio_util::codec::Decoder for Codec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[..4].try_into().expect("4 bytes")) as usize;
        if !(HEADER - 4..=MAX_FRAME).contains(&len) {
            return Err(ProtoError::BadLength(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let kind = src.get_u8();
        let kind = Kind::from_u8(kind).ok_or(ProtoError::BadKind(kind))?;
        let session = src.get_u32();
        let payload = src.split_to(len - 5).freeze();
        Ok(Some(Frame {
            kind,
            session,
            payload,
        }))
    }
}

impl tokio_util::codec::Encoder<Frame> for Codec {
    type Error = ProtoError;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let len = 5 + f.payload.len();
        if len > MAX_FRAME {
            return Err(ProtoError::BadLength(len));
        }
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        dst.put_u8(f.kind as u8);
        dst.put_u32(f.session);
        dst.extend_from_slice(&f.payload);
        Ok(())
    }
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    /// Terminal height in character rows.
    pub rows: u16,
    /// Terminal width in character columns.
    pub cols: u16,
}

/// What a session runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// A program and its arguments (`argv[0]` looked up in `PATH`).
    Exec {
        /// The argument vector.
        argv: Vec<String>,
    },
    /// Stream a tar archive of `path` (a file or a directory, symlinks kept) on stdout.
    ReadArchive {
        /// Absolute path in the guest.
        path: String,
    },
    /// Unpack the tar archive arriving on stdin to `path`: into it when it is a directory,
    /// else as it (the archive's single top entry renamed).
    WriteArchive {
        /// Absolute path in the guest.
        path: String,
    },
}

/// Opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// What to run.
    pub job: Job,
    /// Environment on top of a minimal default (`PATH`, `HOME`, `USER`, `TERM` with a PTY).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (default: the user's home, else `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User name or numeric uid (default root).
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a new PTY of this size (stdout carries the terminal; no stderr).
    #[serde(default)]
    pub tty: Option<WinSize>,
    /// Feed stdin from [`Kind::Stdin`] frames (else `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMsg {
    /// First message of a connection (session 0).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Echoed by the agent's hello.
        nonce: String,
    },
    /// Open the frame's session.
    Start(Start),
    /// No more stdin.
    CloseStdin,
    /// The terminal's new size.
    Resize(WinSize),
    /// Send a signal to the session's process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// The host took `bytes` of output: the agent may send that much more.
    Credit {
        /// Bytes granted.
        bytes: u32,
    },
    /// Ask for [`GuestMsg::Facts`] on the frame's session.
    Facts,
    /// Power the guest off (session 0).
    Shutdown,
    /// Take this identity (a machine restored from a template): answered by
    /// [`GuestMsg::Applied`] or [`GuestMsg::Failed`] on the frame's session.
    Identity(Box<Identity>),
    /// Are you there? (session 0; answered by [`GuestMsg::Pong`]). A guest whose agent died
    /// keeps its port's socket open on the host: only silence tells.
    Ping {
        /// A sequence number the agent echoes in its `Pong`.
        n: u64,
    },
}

/// Guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMsg {
    /// Answer to the host's hello (session 0), right after [`RESYNC`].
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The agent's build version.
        agent: String,
        /// The host's nonce.
        nonce: String,
    },
    /// The session's process runs.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The session could not start, or failed (its last message).
    Failed {
        /// What went wrong, one line.
        error: String,
    },
    /// The session ended (its last message, after all its output).
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal number, when a signal killed it.
        signal: Option<i32>,
        /// True when the agent killed it at its timeout.
        #[serde(default)]
        timed_out: bool,
    },
    /// The agent took `bytes` of stdin: the host may send that much more.
    Credit {
        /// Bytes granted.
        bytes: u32,
    },
    /// Facts about the guest (the session's last message).
    Facts(Facts),
    /// The identity is in place (the session's last message).
    Applied {
        /// What was done, in order, one short line each.
        steps: Vec<String>,
    },
    /// Answer to [`HostMsg::Ping`].
    Pong {
        /// The ping's number.
        n: u64,
    },
}

/// Who a machine restored from a template is: everything that would otherwise be the
/// template's (its clock, random state, addresses, names and keys), applied by the agent before
/// the machine joins its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The host's wall clock: seconds since the epoch.
    pub time_s: i64,
    /// And nanoseconds.
    pub time_ns: u32,
    /// Host entropy mixed into the kernel's RNG, which is then reseeded.
    pub entropy: Vec<u8>,
    /// The template's MAC (how the interface is found).
    pub from_mac: String,
    /// The machine's MAC, `52:54:00:..`.
    pub mac: String,
    /// Its address with prefix, `10.0.0.5/24`.
    pub address: String,
    /// Its default gateway.
    pub gateway: String,
    /// DNS servers for `/etc/resolv.conf`.
    pub dns: Vec<String>,
    /// The guest's hostname (the machine's name).
    pub hostname: String,
    /// `/etc/machine-id` (32 hex digits).
    pub machine_id: String,
    /// root's `authorized_keys` lines.
    pub authorized_keys: Vec<String>,
    /// The SSH host key (OpenSSH private key file).
    pub host_key_private: String,
    /// Its public half.
    pub host_key_public: String,
}

/// What the guest reports about itself for `machine status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// The agent's version.
    pub agent: String,
    /// The guest's hostname.
    pub hostname: String,
    /// The guest kernel's release.
    pub kernel: String,
    /// Seconds since the guest booted.
    pub uptime_s: u64,
    /// Total memory, KiB.
    pub mem_total_kib: u64,
    /// Available memory, KiB.
    pub mem_available_kib: u64,
    /// Size of the root file system, bytes.
    pub disk_total: u64,
    /// Used on the root file system, bytes.
    pub disk_used: u64,
    /// Addresses as `ifname addr/prefix`, loopback excluded.
    pub addresses: Vec<String>,
    /// The name of the guest's PID 1 (`systemd`, ...); empty while the image's init has not
    /// started.
    #[serde(default)]
    pub init: String,
    /// True once the image's init runs as PID 1 (sistemo's initramfs has handed over to it);
    /// for an image that runs one program, once that program runs.
    #[serde(default)]
    pub init_started: bool,
    /// True once the image's init takes commands: systemd has opened its control socket (so
    /// `systemctl` works), or PID 1 is another init.
    #[serde(default)]
    pub init_ready: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn frames_round_trip_across_partial_reads() {
        let frames = vec![
            Frame::control(
                0,
                &HostMsg::Hello {
                    version: VERSION,
                    nonce: "n".into(),
                },
            ),
            Frame::data(Kind::Stdout, 7, vec![0u8, 255, 10, 13]),
            Frame::data(Kind::Stderr, u32::MAX, Vec::new()),
        ];
        let mut wire = BytesMut::new();
        for f in frames.clone() {
            Codec.encode(f, &mut wire).unwrap();
        }
        // Fed one byte at a time, the decoder yields the same frames.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = Codec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_unknown_frames_are_errors() {
        let mut b = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(Codec.decode(&mut b), Err(ProtoError::BadLength(_))));
        let mut b = BytesMut::new();
        b.put_u32(5);
        b.put_u8(99);
        b.put_u32(1);
        assert!(matches!(Codec.decode(&mut b), Err(ProtoError::BadKind(99))));
        let big = Frame::data(Kind::Stdout, 1, vec![0u8; MAX_FRAME]);
        assert!(Codec.encode(big, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn messages_are_tagged_json() {
        let m = HostMsg::Start(Start {
            job: Job::Exec {
                argv: vec!["true".into()],
            },
            env: vec![],
            cwd: None,
            user: None,
            tty: Some(WinSize { rows: 24, cols: 80 }),
            stdin: false,
            timeout_ms: None,
        });
        let f = Frame::control(3, &m);
        let s = String::from_utf8(f.payload.to_vec()).unwrap();
        assert!(
            s.contains(r#""type":"start""#) && s.contains(r#""kind":"exec""#),
            "{s}"
        );
        assert_eq!(f.message::<HostMsg>().unwrap(), m);
        // Fields a newer host adds are ignored; missing optional ones default.
        let m: HostMsg =
            serde_json::from_str(r#"{"type":"start","job":{"kind":"exec","argv":["x"]},"future":1}"#)
                .unwrap();
        assert!(matches!(
            m,
            HostMsg::Start(Start {
                stdin: false,
                tty: None,
                ..
            })
        ));
    }
}
