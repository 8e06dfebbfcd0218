//! The guest's end of a virtio-serial port as async I/O: the device opened non-blocking and
//! driven by tokio's reactor (poll), so bytes move on the agent's own thread, with no copy into
//! a blocking pool's buffer and no thread hand-off per read or write.
//!
//! A port polls as hung up (`EPOLLHUP`) while no host is connected, and tokio keeps a hang-up
//! for good once it has seen it. After the host comes back (the daemon restarted, a clone was
//! restored) such a registration would report the port ready for ever and every wait would
//! spin. So each half has a registration of its own (on its own descriptor) and replaces it
//! when it finds the hang-up stale: the host is connected again but there is nothing to do.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// One open port; [`Port::split`] gives a reader and a writer of it.
pub struct Port(File);

impl Port {
    /// Open the port device `path` (e.g. `/dev/vport1p1`) for reading and writing.
    pub fn open(path: &str) -> io::Result<Port> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Port(f))
    }

    /// A reader and a writer of the same port, each on a descriptor of its own.
    pub fn split(self) -> io::Result<(PortHalf, PortHalf)> {
        let w = self.0.try_clone()?;
        Ok((
            PortHalf::new(self.0, Interest::READABLE)?,
            PortHalf::new(w, Interest::WRITABLE)?,
        ))
    }
}

/// One direction of a [`Port`].
pub struct PortHalf {
    /// Always `Some` between calls (taken only while re-registering).
    fd: Option<AsyncFd<File>>,
    interest: Interest,
}

impl PortHalf {
    fn new(f: File, interest: Interest) -> io::Result<PortHalf> {
        Ok(PortHalf {
            fd: Some(crate::sys::async_fd(f, interest)?),
            interest,
        })
    }

    fn fd(&self) -> &AsyncFd<File> {
        self.fd.as_ref().expect("registered")
    }

    /// A fresh registration: it reports the port as it is now, hung up only if no host is
    /// connected at this moment.
    fn rearm(&mut self) -> io::Result<()> {
        let f = self.fd.take().expect("registered").into_inner();
        self.fd = Some(crate::sys::async_fd(f, self.interest)?);
        Ok(())
    }
}

impl AsyncRead for PortHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd().poll_read_ready(cx))?;
            let hung_up = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // A port with no host reads as ended, never "would block": the host is back,
                // and the hang-up is stale.
                Err(_would_block) if hung_up => self.rearm()?,
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortHalf {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut rearmed = false;
        loop {
            let mut guard = ready!(self.fd().poll_write_ready(cx))?;
            let hung_up = guard.ready().is_write_closed();
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                // Hung up now, not only once: no host takes the bytes. The next host starts a
                // new stream after its resync marker, so they are dropped rather than held.
                Err(_would_block) if hung_up && rearmed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Err(_would_block) if hung_up => {
                    self.rearm()?;
                    rearmed = true;
                }
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
