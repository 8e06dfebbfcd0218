//! The crate's one error type, [`VmmError`]: what a backend, an image build or a disk
//! operation reports, keeping the underlying `std::io::Error` as the source where there is one.

/// Errors of a hypervisor backend, the image store and disk operations.
///
/// An I/O failure keeps its `std::io::Error` as [`std::error::Error::source`], so a caller can
/// tell a full disk (`ErrorKind::StorageFull`, ENOSPC) from other failures. A host program that
/// fails with "No space left on device" is reported the same way.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A host program the backend needs is missing.
    #[error("{program} is not installed: {hint}")]
    Missing {
        /// The program that could not be started.
        program: String,
        /// The command that installs it, e.g. `apt-get install qemu-system-x86`.
        hint: String,
    },
    /// The VMM failed to start or to become ready.
    #[error("machine {name} failed to boot: {reason}")]
    Boot {
        /// The machine that did not boot.
        name: String,
        /// What happened (last console lines where useful).
        reason: String,
    },
    /// Running a command in the machine failed (not the command's own non-zero exit): the
    /// command timed out, or the connection to the guest failed.
    #[error("exec in {name} failed: {reason}")]
    Exec {
        /// The machine the command ran in.
        name: String,
        /// The timeout, or the connection error `ssh` printed.
        reason: String,
    },
    /// A host command (debootstrap, mkfs, apt, ...) failed.
    #[error("{what} failed: {reason}")]
    Command {
        /// What was being done.
        what: String,
        /// Exit status and the end of its error output.
        reason: String,
    },
    /// A value given to this crate is not valid (e.g. a package name).
    #[error("{what} {value:?} is not valid (allowed: {allowed})")]
    Invalid {
        /// What kind of value it is, e.g. `package name`.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What would be accepted.
        allowed: &'static str,
    },
    /// No image matches a reference.
    #[error(
        "image {reference:?} not found (build it with `sistemo image build`, or give a *.ext4 path or URL)"
    )]
    ImageNotFound {
        /// The tag, hash, path or URL asked for.
        reference: String,
    },
    /// A registry has no manifest for a reference (no such repository, tag or digest).
    #[error("image {reference:?} not found in its registry (no such repository, tag or digest there)")]
    NotInRegistry {
        /// The reference, normalised (`docker.io/library/nginx:latest`).
        reference: String,
    },
    /// An image reference or its content was refused: a path outside the allowed folders, a
    /// device, plain http without the opt-in, a digest mismatch, a download over the size cap,
    /// a file that is not ext4.
    #[error("image {reference} refused: {reason}")]
    ImageRefused {
        /// The path or URL as given.
        reference: String,
        /// Why, and what is allowed.
        reason: String,
    },
    /// An OCI registry could not be reached or refused a request (not a missing image).
    #[error("registry {registry}: {reason}")]
    Registry {
        /// The registry host (`127.0.0.1:5000`, `docker.io`).
        registry: String,
        /// What failed.
        reason: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. `cloning A to B`.
        context: String,
        /// The error itself (ENOSPC stays recognisable here).
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// A closure wrapping an I/O error with what was being done, for `map_err`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
        let context = context.into();
        move |source| VmmError::Io { context, source }
    }
}
