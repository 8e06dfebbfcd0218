//! The guest's end of a virtio-serial port as async I/O: the device opened non-blocking and
//! driven by tokio's reactor (poll), so bytes move on the agent's own thread, with no copy into
//! a blocking pool's buffer and no thread hand-off per read or write.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One open port; [`Port::split`] gives a reader and a writer sharing it.
pub struct Port(Arc<AsyncFd<File>>);

impl Port {
    /// Open the port device `path` (e.g. `/dev/vport1p1`) for reading and writing.
    pub fn open(path: &str) -> io::Result<Port> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Port(Arc::new(crate::sys::async_fd(f)?)))
    }

    /// A reader and a writer of the same port.
    pub fn split(self) -> (PortHalf, PortHalf) {
        (PortHalf(self.0.clone()), PortHalf(self.0))
    }
}

/// A handle on a [`Port`], readable and writable.
pub struct PortHalf(Arc<AsyncFd<File>>);

impl AsyncRead for PortHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
