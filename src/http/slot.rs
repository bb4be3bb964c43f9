//! An open connection's place under `limits.max_connections`, and the stream that gives it
//! back before its close can be seen.
//!
//! Owns [`Slot`] (the place under the connection limit, the serving thread's count and the
//! client address's count), [`Connections`] (the count of open connections, checked against
//! a bound that can change while they are open), [`PerAddress`] (counts of what each client
//! address holds, with a bound that can change too), and [`Guarded`], the stream wrapper that
//! releases the slot when the stream shuts down its writing side or is dropped, before the
//! socket closes. A bound lowered below what is held only refuses new places until enough are
//! given back: nothing held is ever taken away. It must never read or write bytes of its own:
//! it only forwards to the stream it wraps.

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
    pub(super) _place: Place,
    pub(super) load: std::sync::Arc<[AtomicUsize]>,
    pub(super) me: usize,
    pub(super) _address: Option<Held>,
}

/// How many connections are open, all serving threads together. The bound is given at each
/// [`Connections::take`] (the `max_connections` of the snapshot the connection took), so a
/// reload that changes it needs nothing here.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
}

/// One open connection's place in [`Connections`]; dropping it gives the place back.
pub struct Place {
    of: Arc<Connections>,
}

impl Connections {
    pub fn new() -> Arc<Connections> {
        Arc::new(Connections::default())
    }

    /// A place, unless `max` (at least 1) are open already. Exact under races: the count
    /// never goes above `max` even for a moment, so a refused attempt cannot make another
    /// one, within the bound, fail too.
    pub fn take(self: &Arc<Self>, max: usize) -> Option<Place> {
        let max = max.max(1);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Place { of: self.clone() })
    }

    /// How many are open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.of.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many things (connections, push streams) each client address holds, each address at
/// most `max` (0: no limit), a bound [`PerAddress::set_max`] changes while places are held.
/// Addresses holding nothing are forgotten, so the map holds at most one entry per thing
/// held.
pub struct PerAddress {
    max: AtomicUsize,
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
            max: AtomicUsize::new(max),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// From now on each address may take places up to `max` (0: no limit). An address that
    /// holds more keeps them and is refused until it holds fewer than `max`.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A place for `addr`, unless it holds the bound set last ([`PerAddress::set_max`])
    /// already.
    pub fn take(self: &Arc<Self>, addr: IpAddr) -> Option<Held> {
        self.take_within(addr, self.max.load(Ordering::Relaxed))
    }

    /// A place for `addr`, unless it holds `max` already (0: no limit): for a caller that
    /// decides by a snapshot of its own (the accept loop, by its connection's limits).
    pub fn take_within(self: &Arc<Self>, addr: IpAddr, max: usize) -> Option<Held> {
        let mut counts = self.counts.lock().ok()?;
        let n = counts.entry(addr).or_insert(0);
        if max > 0 && *n >= max {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_max_connections_refuses_new_ones_never_drops_open_ones_and_a_higher_admits() {
        let conns = Connections::new();
        let mut open: Vec<Place> = (0..4).map(|_| conns.take(4).unwrap()).collect();
        assert!(conns.take(4).is_none(), "at the bound");
        // Lowered to 2 with 4 open: the 4 stay, new ones are refused until the count falls.
        assert!(conns.take(2).is_none());
        assert_eq!(conns.open(), 4, "nothing open is taken away");
        open.truncate(2);
        assert_eq!(conns.open(), 2);
        assert!(conns.take(2).is_none(), "still at the lowered bound");
        open.pop();
        open.push(conns.take(2).expect("room under the lowered bound"));
        assert!(conns.take(2).is_none());
        // Raised: admitted again.
        open.extend((0..6).map(|_| conns.take(8).unwrap()));
        assert!(conns.take(8).is_none());
        assert_eq!(conns.open(), 8);
        drop(open);
        assert_eq!(conns.open(), 0, "every place came back");
        // 0 is read as 1: a server always takes one connection.
        let one = conns.take(0).unwrap();
        assert!(conns.take(0).is_none());
        drop(one);
    }

    #[test]
    fn a_lower_per_address_max_refuses_new_places_never_drops_held_ones_and_a_higher_admits() {
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let per = PerAddress::new(4);
        let mut held: Vec<Held> = (0..4).map(|_| per.take(a).unwrap()).collect();
        assert!(per.take(a).is_none());
        per.set_max(2);
        assert!(per.take(a).is_none(), "over the lowered bound: refused");
        assert_eq!(per.held_by(a), 4, "nothing held is taken away");
        held.truncate(2);
        assert!(per.take(a).is_none(), "at the lowered bound");
        let other = per.take(b).expect("another address has its own count");
        held.pop();
        held.push(per.take(a).expect("room under the lowered bound"));
        assert!(per.take(a).is_none());
        per.set_max(8);
        held.extend((0..6).map(|_| per.take(a).unwrap()));
        assert!(per.take(a).is_none());
        per.set_max(0);
        held.push(per.take(a).expect("0: no limit"));
        // A caller's own bound wins over the one set.
        assert!(per.take_within(a, 3).is_none());
        assert!(per.take_within(b, 3).is_some());
        drop((held, other));
        assert_eq!(per.held_by(a), 0);
        assert!(
            per.counts.lock().unwrap().is_empty(),
            "addresses holding nothing are forgotten"
        );
    }
}
