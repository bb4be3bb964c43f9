//! The operating system below the safe code: every `unsafe` block of the crate lives here.
//!
//! Owns thin, safe wrappers over the system calls and mappings gup needs that the standard
//! library and tokio do not offer: read-only file mappings, sendfile(2) and sendmsg(2) with
//! MSG_MORE, sync_file_range(2), statvfs(2), flock(2), the open-file limit, and a listener registered
//! with the reactor of the thread that calls. Each block states why it is sound (SAFETY). It must never
//! hold state or decide policy; `zerocopy` is the safe module built on these calls, `notify`
//! the safe one that tells systemd a server is ready or stopping. The crate denies
//! `unsafe_code` everywhere else.
#![allow(unsafe_code)]

pub mod notify;
pub mod zerocopy;

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Maps `len` bytes of `file` from `offset` (page-aligned) read-only.
///
/// Sound only for bytes that are written and never change again while mapped: gup maps blob
/// files (immutable once renamed into place) and the written prefix of a fetch's temp file
/// (which only grows). Unlinking either leaves the mapping intact. A disk read error under a
/// mapping raises SIGBUS instead of an error, the price of not copying, as for Varnish's file
/// storage.
pub fn map_written(
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the callers' contract above: the mapped bytes are written and never change.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}

/// sendfile(2): sends up to `len` bytes of `file` from `offset` to `socket`. Returns the count
/// sent, or -1 with errno set.
pub fn sendfile(socket: BorrowedFd<'_>, file: &std::fs::File, offset: u64, len: usize) -> isize {
    let mut off = offset as libc::off_t;
    // SAFETY: both descriptors are borrowed, so open for the duration of the call, and `off` is
    // a valid pointer to an off_t that the call may write.
    unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, len) }
}

/// sendmsg(2) with MSG_MORE (more data follows at once) and MSG_NOSIGNAL: writes a prefix of
/// `bufs` (at most 1024 of them). Returns the count sent, or -1 with errno set.
pub fn send_more(socket: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> isize {
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; the slices and `msg` outlive the
    // call, which only reads them; the socket is borrowed, so open.
    unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    }
}

/// Starts writing `len` bytes at `offset` of `file` to the disk now, without waiting. A hint:
/// failure is ignored (durability still comes from the caller's fsync).
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the descriptor is borrowed, so open for the call; sync_file_range reads no
        // memory of ours.
        unsafe {
            libc::sync_file_range(
                file.as_fd().as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
}

/// A listening socket registered for readiness with the reactor of the calling thread's
/// runtime (tokio's `TcpListener` would register accepted sockets there too; gup hands them
/// to another thread's reactor instead). The listener must be non-blocking.
pub fn register_listener(
    listener: std::net::TcpListener,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::TcpListener>> {
    // SAFETY: the AsyncFd owns the listener, so its descriptor stays open for as long as the
    // registration lives, and `as_raw_fd` always returns that same descriptor.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// accept4(2) with `SOCK_NONBLOCK | SOCK_CLOEXEC`: the next connection of `listener`, already
/// non-blocking. The standard library's `accept` takes only `SOCK_CLOEXEC`, so making the
/// socket non-blocking for tokio cost a second system call (an `ioctl`) per connection, one of
/// eight a `Connection: close` exchange makes (`strace -c`).
pub fn accept_nonblocking(
    listener: &std::net::TcpListener,
) -> std::io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 writes at most `len` bytes of address into the zeroed storage
    // `try_init` gives it and sets `len` to what it wrote; the listener's descriptor is
    // borrowed for the call.
    let (fd, address) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })
    }?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = address
        .as_socket()
        .ok_or_else(|| std::io::Error::other("an accepted connection without an IP address"))?;
    Ok((stream, peer))
}

/// flock(2) `LOCK_EX | LOCK_NB`: takes the exclusive advisory lock of `file` without
/// waiting. `Ok(false)` when another open file (of this or another process) holds it. The lock
/// lasts until `file` is closed, and the kernel drops it when its process dies.
pub fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: the descriptor is borrowed from an open file for the duration of the call, and
    // flock takes no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The open-file (soft) limit now in force.
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        return lim.rlim_cur;
    }
    1024
}

/// Raises the soft open-file limit to the hard one, so that many push streams fit. Returns
/// the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Bytes an unprivileged process may still write on the filesystem holding `path`
/// (statvfs(2): available blocks times the fragment size).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: an all-zero statvfs is a valid value for the call to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st` is a valid
    // pointer to a statvfs the call writes.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
