//! An open connection's place under `limits.max_connections`, and the stream that gives it
//! back before its close can be seen.
//!
//! Owns [`Slot`] (the connection-limit permit, the serving thread's count and the client
//! address's count), [`PerAddress`] (counts of what each client address holds, with a
//! bound), and [`Guarded`], the stream wrapper that releases the slot when the stream shuts
//! down its writing side or is dropped, before the socket closes. It must never read or write
//! bytes of its own: it only forwards to the stream it wraps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an open connection holds: its place under `limits.max_connections` and its count on
/// the thread serving it. Released before the connection's close can be seen (see
/// [`Guarded`]), so a client that saw the close and connects again finds the place free.
pub struct Slot {
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
    pub(super) load: std::sync::Arc<[AtomicUsize]>,
    pub(super) me: usize,
    pub(super) _address: Option<Held>,
}

/// How many things (connections, push streams) each client address holds, each address at
/// most `max` (0: no limit). Addresses holding nothing are forgotten, so the map holds at
/// most one entry per thing held.
pub struct PerAddress {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One thing an address holds; dropping it gives the place back.
pub struct Held {
    of: Arc<PerAddress>,
    addr: IpAddr,
}

impl PerAddress {
    pub fn new(max: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A place for `addr`, unless it holds `max` already.
    pub fn take(self: &Arc<Self>, addr: IpAddr) -> Option<Held> {
        let mut counts = self.counts.lock().ok()?;
        let n = counts.entry(addr).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Held {
            of: self.clone(),
            addr,
        })
    }

    /// How many `addr` holds now.
    pub fn held_by(&self, addr: IpAddr) -> usize {
        self.counts
            .lock()
            .map(|c| c.get(&addr).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.of.counts.lock() {
            if let Some(n) = counts.get_mut(&self.addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&self.addr);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.load[self.me].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream with its [`Slot`]: the slot goes when the stream shuts down its
/// writing side or is dropped, before the socket closes. (Releasing it after the serving task
/// ended let a client that had already seen the close be refused: a test making three new
/// connections right after closing three at `max_connections = 3` failed 7 runs in 20.)
pub struct Guarded<I> {
    /// Declared first: dropped before `io`, whose drop closes the socket.
    slot: Option<Slot>,
    io: I,
}

impl<I> Guarded<I> {
    /// `io` holding `slot` until it shuts down or drops.
    pub fn new(slot: Slot, io: I) -> Guarded<I> {
        Guarded {
            slot: Some(slot),
            io,
        }
    }
}

impl<I> Guarded<I> {
    /// The stream itself.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The same slot around another stream built from this one.
    pub fn map<J>(mut self, f: impl FnOnce(I) -> J) -> Guarded<J> {
        let slot = self.slot.take();
        Guarded {
            slot,
            io: f(self.io),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// The slot is released before the peer can see the end of the stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.slot = None;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
