//! Zero-copy sending: read-only file mappings whose bytes a plain-TCP connection hands to the
//! kernel with sendfile(2) instead of copying them through user space.
//!
//! Owns the registry of live mappings (address range -> file and offset), mappings shared by
//! concurrent readers of one file ([`map_shared`]), and [`Stream`], the TCP stream wrapper
//! hyper writes through. A response body stays an ordinary `Bytes` (so ranges, pacing, HEAD
//! and TLS work unchanged); when a slice hyper asks to write lies wholly inside a registered
//! mapping, the stream sends that file region with sendfile, which on Linux passes page-cache
//! pages to the socket by reference, as nginx's `sendfile on` does.
//! It must never change which bytes go out: only mappings of files that are never rewritten
//! (verified blobs, and the written part of a fetch's temp file) are registered, so the file
//! region holds exactly the bytes of the mapping.
//!
//! Why not a crate: hyper owns the connection and only ever sees memory, and no maintained
//! crate bridges its body frames to sendfile; this is the smallest bridge that keeps hyper.
//! The system calls themselves are `sys`'s; this module holds no `unsafe` code.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A registered file region: `len` bytes of `file` from `offset`, mapped at the key address.
struct Region {
    len: usize,
    file: Arc<std::fs::File>,
    offset: u64,
}

/// Live mappings by start address. Looked up once per write call, changed once per mapping.
static REGISTRY: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());

/// A mapping that stays registered while it lives (and keeps whatever `hold` is alive, such
/// as a store read guard).
struct Mapping {
    map: memmap2::Mmap,
    _hold: Option<Hold>,
    registered: bool,
}

/// What a mapping keeps alive until its last slice is dropped (a store read guard).
pub type Hold = Box<dyn Send + Sync>;

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregistered before the unmap (the field drops after this): no lookup can ever
        // find an address that is no longer this file's.
        if self.registered {
            if let Ok(mut r) = REGISTRY.write() {
                r.remove(&(self.map.as_ptr() as usize));
            }
        }
    }
}

/// Blobs up to this size are sent with sendfile; larger ones are copied from their mapping.
///
/// Measured on loopback (`benches/compare.sh`, 2 cores, AMD EPYC): for 1 MiB responses at 50
/// connections, sendfile gave 5.7 GB/s against 4.1 to 4.4 GB/s by copy (and on 2026-12-05,
/// `benches/ab.sh`, 5,516 against 3,828 MiB/s); for eight concurrent 256 MiB downloads of one
/// blob copying wins (3.0 to 3.4 GB/s by sendfile against 3.8 to 4.3 by copy, before
/// mappings were shared; with one shared mapping, copies 3,600-4,800 MiB/s against sendfile
/// 3,000-3,400). Long streams of one file from many connections pay for sendfile's per-page
/// reference counting on the shared page-cache pages more than the copy costs; short
/// responses gain more from skipping the copy. On an Intel Xeon (THP madvise) nginx's copy
/// beat its own sendfile at 1 MiB as well (issue 23): this threshold is one machine's, and a
/// rule measured at start-up is still to be built.
const SENDFILE_MAX_BYTES: u64 = 16 << 20;

/// Whether a blob of `size` bytes is worth sending with sendfile (see [`SENDFILE_MAX_BYTES`]):
/// the `zero_copy` argument of [`map`] for its slices.
pub fn sendfile_pays(size: u64) -> bool {
    size <= SENDFILE_MAX_BYTES
}

/// Maps `len` bytes of `file` at `offset` read-only; with `zero_copy`, registered so that a
/// [`Stream`] sends them with sendfile (else they are ordinary memory to it).
///
/// The caller guarantees that those bytes are written and never change again, and that the
/// file is never truncated below them while mapped (gup's blob files are immutable once
/// renamed into place, and a fetch's temp file only grows; unlinking either leaves mappings
/// intact). `hold` is dropped with the last slice of the mapping.
pub fn map(
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
    hold: Option<Hold>,
    zero_copy: bool,
) -> std::io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let (mapping, skip) = mapping(file, offset, len, hold, zero_copy)?;
    Ok(Bytes::from_owner(mapping).slice(skip..))
}

/// As [`map`] for the whole of a file of `len` bytes (not empty), with a [`Shared`] handle
/// through which later readers of the same file take slices of this one mapping while it
/// lives, instead of mapping it again.
///
/// Why: every mapping of a large blob pays a page fault per 64 KiB it reads and an unmap
/// of every page at its end, per response. Eight concurrent downloads of one 256 MiB blob
/// spent about 15% of the node's CPU there (`perf record`, page faults and
/// `unmap_page_range`); a release is many clients reading one blob at once, so they share
/// one mapping, whose pages are faulted in once.
pub fn map_shared(
    file: Arc<std::fs::File>,
    len: usize,
    hold: Option<Hold>,
    zero_copy: bool,
) -> std::io::Result<(Bytes, Shared)> {
    if len == 0 {
        return Err(std::io::Error::other(
            "an empty file has no mapping to share",
        ));
    }
    let (mapping, _) = mapping(file, 0, len, hold, zero_copy)?;
    let mapping = Arc::new(mapping);
    let shared = Shared(Arc::downgrade(&mapping));
    Ok((Bytes::from_owner(Owner(mapping)), shared))
}

/// A mapping made by [`map_shared`], without keeping it alive.
#[derive(Clone)]
pub struct Shared(std::sync::Weak<Mapping>);

impl Shared {
    /// The whole mapping again, while any of its slices lives.
    pub fn bytes(&self) -> Option<Bytes> {
        self.0.upgrade().map(|m| Bytes::from_owner(Owner(m)))
    }

    /// Whether any slice of the mapping lives.
    pub fn is_live(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// One shared mapping as the owner of a `Bytes`.
struct Owner(Arc<Mapping>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// The mapping behind [`map`] and [`map_shared`], and how many bytes of it come before
/// `offset` (mappings start page-aligned).
fn mapping(
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
    hold: Option<Hold>,
    zero_copy: bool,
) -> std::io::Result<(Mapping, usize)> {
    /// Mapping offsets must be page-aligned; 64 KiB is a multiple of every page size in use.
    const ALIGN: u64 = 64 << 10;
    let start = offset - offset % ALIGN;
    let skip = (offset - start) as usize;
    // The contract above is `sys::map_written`'s.
    let map = super::map_written(&file, start, skip + len)?;
    // Readahead for the sequential read a download is; failure only loses the hint.
    let _ = map.advise(memmap2::Advice::Sequential);
    let region = Region {
        len: map.len(),
        file,
        offset: start,
    };
    let key = map.as_ptr() as usize;
    let mapping = Mapping {
        map,
        _hold: hold,
        registered: zero_copy,
    };
    if zero_copy {
        match REGISTRY.write() {
            Ok(mut r) => {
                r.insert(key, region);
            }
            // A poisoned registry only costs the zero-copy path: the bytes are still served.
            Err(_) => tracing::warn!("mapping registry poisoned; sending by copy"),
        }
    }
    Ok((mapping, skip))
}

/// The file region holding `slice`, when it lies wholly inside a live mapping.
fn lookup(slice: &[u8]) -> Option<(Arc<std::fs::File>, u64)> {
    lookup_addr(slice.as_ptr() as usize, slice.len())
}

fn lookup_addr(addr: usize, len: usize) -> Option<(Arc<std::fs::File>, u64)> {
    let r = REGISTRY.read().ok()?;
    let (start, region) = r.range(..=addr).next_back()?;
    let within = addr - start;
    (within + len <= region.len).then(|| (region.file.clone(), region.offset + within as u64))
}

/// How many mappings are live (for tests and diagnostics).
pub fn live_mappings() -> usize {
    REGISTRY.read().map(|r| r.len()).unwrap_or(0)
}

/// A plain TCP connection that sends mapped file bytes with sendfile(2).
pub struct Stream {
    inner: TcpStream,
}

impl Stream {
    pub fn new(inner: TcpStream) -> Stream {
        Stream { inner }
    }

    /// The connection itself.
    pub fn into_inner(self) -> TcpStream {
        self.inner
    }

    /// Sends up to `len` bytes of `file` from `offset`; how many went out.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: &std::fs::File,
        offset: u64,
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        self.poll_send(cx, |socket| super::sendfile(socket, file, offset, len))
    }

    /// Writes a prefix of `bufs` with MSG_MORE: more data follows at once.
    fn poll_send_more(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_send(cx, |socket| super::send_more(socket, bufs))
    }

    /// Runs `send` (a system call on the socket returning a byte count, or -1 with errno) once
    /// the socket is writable; how many bytes went out.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        mut send: impl FnMut(std::os::fd::BorrowedFd<'_>) -> isize,
    ) -> Poll<std::io::Result<usize>> {
        use std::os::fd::AsFd;
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                let n = send(self.inner.as_fd());
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match sent {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Not writable after all: poll_write_ready registers for the next readiness.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Writes a prefix of `bufs`: a mapped first slice with sendfile, else the slices before
    /// the first mapped one with writev. Writing a prefix is what the trait allows; hyper
    /// calls again for the rest.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if let Some((file, offset)) = lookup(&bufs[first]) {
            return this.poll_sendfile(cx, &file, offset, bufs[first].len());
        }
        // The first slice is not mapped (looked up above); is a later one?
        match bufs[first + 1..]
            .iter()
            .position(|b| !b.is_empty() && lookup(b).is_some())
        {
            // A response head before file bytes: corked (MSG_MORE) so that it leaves in the
            // same segments as the file's first bytes, as nginx's tcp_nopush does.
            Some(n) => this.poll_send_more(cx, &bufs[first..first + 1 + n]),
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[first..]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<std::fs::File>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        let file = Arc::new(std::fs::File::open(f.path()).unwrap());
        (f, file)
    }

    #[tokio::test]
    async fn sends_mapped_slices_from_the_file_and_the_rest_from_memory() {
        let content: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (_tmp, file) = file_of(&content);
        // An unaligned offset, as a range request makes.
        let mapped = map(file, 70_001, 200_000, None, true).unwrap();
        assert_eq!(&mapped[..], &content[70_001..270_001]);
        assert!(lookup(&mapped[10..20]).is_some());
        assert!(lookup(b"plain memory").is_none());

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut out = Stream::new(TcpStream::connect(addr).await.unwrap());
        let head = b"HEAD BYTES|".to_vec();
        let tail = b"|TAIL".to_vec();
        let (a, b) = mapped.split_at(123_457);
        // Vectored writes of memory, mapping, mapping, memory, until all is out.
        let parts: [&[u8]; 4] = [&head, a, b, &tail];
        let mut at = [0usize; 4];
        loop {
            let slices: Vec<IoSlice<'_>> = parts
                .iter()
                .zip(at.iter())
                .map(|(p, n)| IoSlice::new(&p[*n..]))
                .collect();
            let mut n = out.write_vectored(&slices).await.unwrap();
            if n == 0 {
                break;
            }
            for (p, done) in parts.iter().zip(at.iter_mut()) {
                let take = n.min(p.len() - *done);
                *done += take;
                n -= take;
            }
        }
        out.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        let mut want = head.clone();
        want.extend_from_slice(&content[70_001..270_001]);
        want.extend_from_slice(&tail);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes on the wire differ");
    }

    #[test]
    fn a_mapping_is_registered_while_any_slice_lives() {
        let (_tmp, file) = file_of(&[9u8; 100_000]);
        let whole = map(file.clone(), 0, 100_000, None, true).unwrap();
        let copied = map(file.clone(), 0, 100_000, None, false).unwrap();
        assert!(
            lookup(&copied).is_none(),
            "only zero-copy mappings are registered"
        );
        assert_eq!(&copied[..], &whole[..]);
        let part = whole.slice(50..60);
        let addr = part.as_ptr() as usize;
        drop(whole);
        let (found, offset) = lookup(&part).unwrap();
        assert!(Arc::ptr_eq(&found, &file));
        assert_eq!(offset, 50);
        drop((part, found));
        // Other tests may map something at the same address meanwhile, but never this file.
        if let Some((other, _)) = lookup_addr(addr, 1) {
            assert!(
                !Arc::ptr_eq(&other, &file),
                "a dropped mapping stays registered"
            );
        }
    }
}
