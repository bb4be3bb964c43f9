//! Fast exchanges: plain HTTP/1.1 connections whose requests a [`FastPath`] answers without
//! hyper, axum or the router.
//!
//! Owns only the framing of those exchanges: reading request heads with `httparse` (the parser
//! hyper itself uses) into one bounded buffer (`limits.max_header_bytes`, as hyper's), asking
//! the caller's [`FastPath`] for the answer, writing the status line, the caller's fields,
//! `content-length`, `connection` and `date` exactly as hyper writes them, pipelined answers
//! in order and in one write, keep-alive, `Connection: close`, HTTP/1.0, and
//! `limits.header_read_timeout` while waiting for a head. Measured reason (issue 23): a kept
//! alive 1 KiB request cost gup ~23 µs of CPU against nginx's ~17 µs, spread thin over hyper's
//! parse and encode, axum's routing, header maps and per-request allocations.
//!
//! It must never answer a request the [`FastPath`] declined, nor anything it cannot frame
//! exactly as hyper would (a body, `Expect`, `Upgrade`, an unusual `Connection`, a parse
//! error, an oversized head): the connection then goes to hyper, with every byte already
//! read ([`Rewind`]), and stays there, so those requests get exactly today's answers. It never
//! knows a route: the [`FastPath`] is the layer above's.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Header fields a fast request may have; a request with more goes to hyper (which allows
/// 100).
const MAX_HEADERS: usize = 32;

/// The read buffer starts this small (an idle kept-alive connection holds it) and doubles up
/// to the connection's bound.
const INITIAL_BUFFER: usize = 2048;

/// Answers of pipelined requests are gathered into one write up to about this many bytes.
const GATHER: usize = 64 << 10;

/// Bodies up to this size are copied behind their head into one write; larger ones (mapped
/// blobs among them, which the stream may send with sendfile) go out as a second slice of
/// one vectored write.
const COPY_BODY_MAX: usize = 16 << 10;

/// A parsed request head as a [`FastPath`] sees it.
pub struct FastRequest<'a> {
    /// `GET`, `HEAD`, ... as sent.
    pub method: &'a str,
    /// The request target as sent (not decoded).
    pub path: &'a str,
    /// Every header field, in order.
    pub headers: &'a [httparse::Header<'a>],
}

/// A complete answer to a fast request: what the router would have answered.
pub struct FastAnswer {
    pub status: StatusCode,
    /// The value of `content-length` (of the full body, also for HEAD).
    pub content_length: u64,
    /// The body; None for an answer without one (HEAD).
    pub body: Option<Bytes>,
}

/// The layer above's answers to the requests it can answer without its router: given a
/// request, it appends the response's header fields (each `name: value\r\n`, lower-case
/// names, in the router's order, without `content-length`, `connection` or `date`) to
/// `fields` and returns the answer, or returns None (leaving `fields` as it found it) for
/// the router to answer.
pub trait FastPath: Send + Sync + 'static {
    fn answer(&self, req: &FastRequest<'_>, fields: &mut Vec<u8>) -> Option<FastAnswer>;
}

/// Which connections are push streams: how many first bytes the test looks at, and the
/// test (`server::Lean`'s).
pub type LeanTest = (usize, fn(&[u8]) -> bool);

/// How a fast connection ended.
pub enum Ended<I> {
    /// Closed (by either side, a timeout, or shutdown).
    Closed,
    /// The last answer was written and the connection ends after it (`Connection: close`,
    /// HTTP/1.0): the stream, for the caller to close as its transport wants (a plain socket
    /// is dropped, a TLS session sends its `close_notify` first, as hyper's shutdown does).
    Done(I),
    /// Its first bytes are a push stream's (the `lean` test of [`serve`]): the stream and
    /// the bytes read from it, for `pushconn`.
    Lean(Vec<u8>, I),
    /// A request the fast path does not answer: the stream, with the bytes read but not
    /// answered in front of it, for hyper.
    ToHyper(Rewind<I>),
}

/// What one parsed request asks of the connection.
enum Step {
    /// Answered; keep the connection for the next request or not. A large body is not
    /// copied behind its head: it goes out as the second slice of one write, at once.
    Answered {
        keep_alive: bool,
        large: Option<Bytes>,
    },
    /// Not ours: hand the connection over from this request on.
    Decline,
}

/// Serves `io` while its requests are ones `fast` answers; hands it to hyper at the first
/// that is not (or that it cannot frame exactly as hyper would). A connection whose first
/// read bytes `lean` matches (on at most `peek` of them, as the accept loop's peek would see
/// them) is handed back untouched for `pushconn`: no peek, no second wait for its first bytes.
pub async fn serve<I>(
    mut io: I,
    fast: &dyn FastPath,
    lean: Option<LeanTest>,
    max_header_bytes: usize,
    header_read_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // hyper's read buffer bound (`max_buf_size`): a head that does not fit is hyper's to refuse.
    let cap = max_header_bytes.max(8192);
    let mut buf = vec![0u8; INITIAL_BUFFER.min(cap)];
    let (mut start, mut end) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::new();
    let mut fields: Vec<u8> = Vec::with_capacity(256);
    let mut date = DateCache::default();
    // One timer for the connection's whole life, moved forward for each head (moving a
    // tokio timer later does not touch the timer wheel).
    let mut sleep = Box::pin(tokio::time::sleep(header_read_timeout));
    let mut waiting_since: Option<Instant> = None;
    let mut first = true;
    loop {
        if first && end > 0 {
            first = false;
            if let Some((peek, matches)) = lean {
                if matches(&buf[..end.min(peek)]) {
                    buf.truncate(end);
                    return Ended::Lean(buf, io);
                }
            }
        }
        // Answer every complete head buffered, in order.
        while start < end {
            let step = {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf[start..end]) {
                    Ok(httparse::Status::Complete(n)) => {
                        let step = answer(&req, fast, &mut fields, &mut out, &mut date);
                        if !matches!(step, Step::Decline) {
                            start += n;
                        }
                        step
                    }
                    Ok(httparse::Status::Partial) => break,
                    Err(_) => Step::Decline,
                }
            };
            waiting_since = None;
            match step {
                Step::Answered { keep_alive, large } => {
                    let written = match large {
                        Some(body) => write_with(&mut io, &mut out, &body).await,
                        None if out.len() >= GATHER || !keep_alive => {
                            flush(&mut io, &mut out).await
                        }
                        None => Ok(()),
                    };
                    if written.is_err() {
                        return Ended::Closed;
                    }
                    if !keep_alive {
                        return Ended::Done(io);
                    }
                }
                Step::Decline => {
                    if flush(&mut io, &mut out).await.is_err() {
                        return Ended::Closed;
                    }
                    let rest = buf[start..end].to_vec();
                    return Ended::ToHyper(Rewind::new(rest, io));
                }
            }
        }
        if flush(&mut io, &mut out).await.is_err() {
            return Ended::Closed;
        }
        // Keep the unanswered bytes at the front; grow within the bound.
        if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if end == buf.len() {
            if buf.len() >= cap {
                // A head larger than hyper's buffer: hyper answers it as it does today.
                let rest = buf[..end].to_vec();
                return Ended::ToHyper(Rewind::new(rest, io));
            }
            buf.resize((buf.len() * 2).min(cap), 0);
        }
        if *stop.borrow() {
            // Shutting down: no new request is started on this connection.
            return Ended::Closed;
        }
        let since = *waiting_since.get_or_insert_with(Instant::now);
        sleep
            .as_mut()
            .reset(tokio::time::Instant::from_std(since + header_read_timeout));
        let read = tokio::select! {
            biased;
            r = io.read(&mut buf[end..]) => r,
            _ = &mut sleep => return Ended::Closed,
            _ = stop.changed() => return Ended::Closed,
        };
        match read {
            Ok(0) | Err(_) => return Ended::Closed,
            Ok(n) => end += n,
        }
    }
}

/// Writes what is gathered in `out` and empties it.
async fn flush<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = io.write_all(out).await;
    out.clear();
    r
}

/// Writes what is gathered in `out`, then `body`, as one vectored write where the stream
/// takes it all; empties `out`.
async fn write_with<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    body: &[u8],
) -> std::io::Result<()> {
    let (mut head, mut rest) = (&out[..], body);
    let result = loop {
        if head.is_empty() && rest.is_empty() {
            break Ok(());
        }
        let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(rest)];
        match io.write_vectored(&slices).await {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                let h = n.min(head.len());
                head = &head[h..];
                n -= h;
                rest = &rest[n..];
            }
            Err(e) => break Err(e),
        }
    };
    out.clear();
    result
}

/// Decides one complete request head: answered into `out`, or declined.
fn answer(
    req: &httparse::Request<'_, '_>,
    fast: &dyn FastPath,
    fields: &mut Vec<u8>,
    out: &mut Vec<u8>,
    date: &mut DateCache,
) -> Step {
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Step::Decline;
    };
    let http10 = version == 0;
    // What the connection says: only the forms hyper answers in a way written below.
    let mut connection: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            if connection.is_some() {
                return Step::Decline;
            }
            connection = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if h.value != b"0" {
                return Step::Decline;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Step::Decline;
        }
    }
    // (keep alive, the `connection` field hyper adds to the answer)
    let (keep_alive, echo): (bool, &[u8]) = match connection {
        None => (!http10, b""),
        Some(v) if v.eq_ignore_ascii_case(b"close") && !http10 => (false, b"connection: close\r\n"),
        Some(v) if v.eq_ignore_ascii_case(b"keep-alive") => {
            if http10 {
                (true, b"connection: keep-alive\r\n")
            } else {
                (true, b"")
            }
        }
        Some(_) => return Step::Decline,
    };
    fields.clear();
    let request = FastRequest {
        method,
        path,
        headers: req.headers,
    };
    let Some(answer) = fast.answer(&request, fields) else {
        return Step::Decline;
    };
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(answer.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        answer
            .status
            .canonical_reason()
            .unwrap_or("<none>")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(fields);
    out.extend_from_slice(b"content-length: ");
    // Formatting into a Vec cannot fail.
    let _ = write!(out, "{}", answer.content_length);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(echo);
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(date.now());
    out.extend_from_slice(b"\r\n\r\n");
    match answer.body {
        Some(body) if body.len() > COPY_BODY_MAX => Step::Answered {
            keep_alive,
            large: Some(body),
        },
        Some(body) => {
            out.extend_from_slice(&body);
            Step::Answered {
                keep_alive,
                large: None,
            }
        }
        None => Step::Answered {
            keep_alive,
            large: None,
        },
    }
}

/// The `date` field's value, formatted once per second.
#[derive(Default)]
struct DateCache {
    second: u64,
    text: Vec<u8>,
}

impl DateCache {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

/// A stream with bytes already read from it in front: hyper reads those first.
pub struct Rewind<I> {
    prefix: Vec<u8>,
    pos: usize,
    inner: I,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Vec<u8>, inner: I) -> Rewind<I> {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::{duplex, DuplexStream};

    /// Answers `GET /fast` with a 200 of body "ok" and one field; declines the rest.
    struct Ok2;

    impl FastPath for Ok2 {
        fn answer(&self, req: &FastRequest<'_>, fields: &mut Vec<u8>) -> Option<FastAnswer> {
            (req.path == "/fast").then(|| {
                fields.extend_from_slice(b"x-a: 1\r\n");
                FastAnswer {
                    status: StatusCode::OK,
                    content_length: 2,
                    body: (req.method == "GET").then(|| Bytes::from_static(b"ok")),
                }
            })
        }
    }

    async fn run(server: DuplexStream, max: usize, timeout: Duration) -> Ended<DuplexStream> {
        let (_tx, mut rx) = watch::channel(false);
        let lean: fn(&[u8]) -> bool = |b| b.starts_with(b"GET /stream");
        serve(server, &Ok2, Some((11, lean)), max, timeout, &mut rx).await
    }

    /// What the server wrote, with every `date` value blanked.
    async fn written(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        String::from_utf8_lossy(&got)
            .split("\r\n")
            .map(|l| {
                if l.starts_with("date: ") {
                    "date: -"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    const ANSWER: &str = "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ndate: -\r\n\r\nok";

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_and_the_first_declined_goes_on_with_its_bytes(
    ) {
        let (mut client, server) = duplex(1 << 16);
        let rest = b"GET /other HTTP/1.1\r\n\r\nGET /fast HTTP/1.1\r\n\r\n";
        let mut all = b"GET /fast HTTP/1.1\r\n\r\nHEAD /fast HTTP/1.1\r\n\r\n".to_vec();
        all.extend_from_slice(rest);
        client.write_all(&all).await.unwrap();
        let Ended::ToHyper(mut rewound) = run(server, 8192, Duration::from_secs(5)).await else {
            panic!("the declined request goes on");
        };
        let mut prefix = vec![0u8; rest.len()];
        rewound.read_exact(&mut prefix).await.unwrap();
        assert_eq!(prefix, rest, "every byte not answered, in order");
        drop(rewound);
        let head = "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ndate: -\r\n\r\n";
        assert_eq!(written(&mut client).await, format!("{ANSWER}{head}"));
    }

    #[tokio::test]
    async fn close_and_http_1_0_end_the_connection_after_the_answer() {
        for (req, want) in [
            (
                "GET /fast HTTP/1.1\r\nConnection: close\r\n\r\n",
                "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\nconnection: close\r\ndate: -\r\n\r\nok",
            ),
            (
                "GET /fast HTTP/1.0\r\n\r\n",
                "HTTP/1.0 200 OK\r\nx-a: 1\r\ncontent-length: 2\r\ndate: -\r\n\r\nok",
            ),
        ] {
            let (mut client, server) = duplex(1 << 16);
            client.write_all(req.as_bytes()).await.unwrap();
            let ended = run(server, 8192, Duration::from_secs(5)).await;
            assert!(matches!(ended, Ended::Done(_)), "{req}");
            // The caller closes it.
            drop(ended);
            assert_eq!(written(&mut client).await, want);
        }
    }

    #[tokio::test]
    async fn a_head_in_pieces_is_answered_and_an_oversized_one_goes_on_whole() {
        let (mut client, server) = duplex(1 << 16);
        let serving = tokio::spawn(run(server, 8192, Duration::from_secs(5)));
        for piece in ["GE", "T /fa", "st HTTP/1.1\r\n", "\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; ANSWER.len()];
        client.read_exact(&mut got).await.unwrap();
        // 9 KiB of head: over hyper's 8 KiB buffer bound.
        let big = format!(
            "GET /fast HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(9 << 10)
        );
        client.write_all(big.as_bytes()).await.unwrap();
        let Ended::ToHyper(mut rewound) = serving.await.unwrap() else {
            panic!("an oversized head is hyper's to refuse");
        };
        let mut prefix = vec![0u8; 8192];
        rewound.read_exact(&mut prefix).await.unwrap();
        assert_eq!(&prefix[..], &big.as_bytes()[..8192]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_head_in_time_is_closed() {
        let (mut client, server) = duplex(1 << 16);
        let serving = tokio::spawn(run(server, 8192, Duration::from_secs(10)));
        client.write_all(b"GET /fast HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!serving.is_finished(), "within the timeout");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(matches!(serving.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn a_push_stream_is_handed_back_with_its_bytes() {
        let (mut client, server) = duplex(1 << 16);
        let req = b"GET /stream HTTP/1.1\r\n\r\n";
        client.write_all(req).await.unwrap();
        let Ended::Lean(read, _) = run(server, 8192, Duration::from_secs(5)).await else {
            panic!("a push stream goes to pushconn");
        };
        assert_eq!(read, req);
    }

    #[tokio::test]
    async fn unusual_framing_goes_to_hyper() {
        for req in [
            "GET /fast HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            "GET /fast HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /fast HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET /fast HTTP/1.1\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n",
            "GET /fast HTTP/1.1\r\nconnection: close\r\nconnection: close\r\n\r\n",
            "GET /fast HTTP/1.0\r\nconnection: close\r\n\r\n",
            "GET /fast HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            let (mut client, server) = duplex(1 << 16);
            client.write_all(req.as_bytes()).await.unwrap();
            let Ended::ToHyper(mut rewound) = run(server, 8192, Duration::from_secs(5)).await
            else {
                panic!("{req:?} goes to hyper");
            };
            let mut prefix = vec![0u8; req.len()];
            rewound.read_exact(&mut prefix).await.unwrap();
            assert_eq!(prefix, req.as_bytes());
        }
    }
}
