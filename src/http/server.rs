//! Running an HTTP server on a listener the caller bound, until a shutdown future resolves.
//!
//! Owns the accept loop every role uses (`run(listener, router, shutdown, options)`, after
//! mini-redis): one single-threaded runtime per serving thread, connections handed to the
//! least loaded thread, the connection limits and how their slots are released, the choice
//! between hyper and a lean push connection, and graceful shutdown with a bounded drain. The
//! limits are live ([`LiveLimits`]): each accepted connection is admitted and served by the
//! snapshot it took when it was accepted, so a reload changes what new connections get and
//! never closes an open one (a lowered `max_connections` or `max_connections_per_address` only
//! refuses new ones until enough have closed); the number of threads is fixed at start. It
//! must never know routes or roles: which connections are push streams is the caller's
//! predicate ([`Lean`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::fastconn::FastPath;
use super::limits::{Limits, LiveLimits};
use super::slot::{Connections, Guarded, PerAddress, Slot};
use super::tls::Tls;

/// How long in-flight responses get to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// Which plain connections are long-lived push streams, served without hyper's buffers
/// ([`super::pushconn`]): the caller's test of a connection's first `peek` bytes.
#[derive(Clone, Copy)]
pub struct Lean {
    /// How many bytes the test needs.
    pub peek: usize,
    /// Whether a connection starting with these bytes is a push stream.
    pub matches: fn(&[u8]) -> bool,
}

/// How a server serves its connections.
#[derive(Clone)]
pub struct Serving {
    /// The limits in force, shared with whoever applies a reload (every clone shares them).
    pub limits: LiveLimits,
    /// TLS: the port then speaks only TLS (and every connection goes through hyper).
    pub tls: Option<Tls>,
    pub lean: Option<Lean>,
    /// Requests the layer above answers without its router on plain connections
    /// ([`super::fastconn`]); the first one it declines hands the connection to hyper.
    pub fast: Option<Arc<dyn FastPath>>,
    /// Told of every connection refused by a limit (`max_connections` or
    /// `max_connections_per_address`), to count it.
    pub on_refused: Option<Refusals>,
}

/// Where refused connections are reported: the limit's name.
pub type Refusals = std::sync::Arc<dyn Fn(&'static str) + Send + Sync>;

/// Serves `router` on `listener` until `shutdown`, then drains for at most [`DRAIN`].
///
/// Connections are served on `limits.threads` threads (as they are at start), each with its own single-threaded
/// runtime accepting from the shared listener (the shape of nginx's workers). The thread that
/// accepts a connection gives it to the thread with the fewest open ones, and from then on it
/// lives on that one thread, so a request never crosses threads and every ready connection waits
/// its turn in one FIFO queue. tokio's work-stealing runtime, by contrast, let connections
/// whose wake-ups overflowed a worker's local queue wait behind many turns of the others
/// (p99 at 1000 connections 2 to 4 times nginx's). Work a handler spawns (an upstream fetch)
/// runs on the thread that spawned it. Each connection is served by hyper with the given
/// limits (and TLS when given), its peer address available to handlers as
/// `ConnectInfo<SocketAddr>`.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    serving: Serving,
) -> std::io::Result<()> {
    let Serving {
        limits,
        tls,
        lean,
        fast,
        on_refused,
    } = serving;
    // Bounds come from each connection's snapshot of the limits (`take_within`).
    let per_address = PerAddress::new(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let open = Connections::new();
    let listener = listener.into_std()?;
    // Listening again only deepens the queue of connections not yet accepted (tokio binds
    // with 128): 1,000 clients connecting at once overflowed it, and each dropped SYN cost its
    // client a 1 s retransmit (wrk's p99 at 1,000 connections went from ~15 ms to ~1.2 s).
    socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG)?;
    let threads = limits.get().threads.max(1);
    let load: Arc<[AtomicUsize]> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
    // Every thread's runtime exists before any thread accepts, so that each can hand a
    // connection to another.
    let runtimes = (0..threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let handles: Arc<[tokio::runtime::Handle]> =
        runtimes.iter().map(|rt| rt.handle().clone()).collect();
    let mut done = Vec::new();
    for (i, rt) in runtimes.into_iter().enumerate() {
        let listener = listener.try_clone()?;
        let worker = Worker {
            handles: handles.clone(),
            router: router.clone(),
            limits: limits.clone(),
            tls: tls.clone(),
            lean,
            fast: fast.clone(),
            open: open.clone(),
            per_address: per_address.clone(),
            on_refused: on_refused.clone(),
            stop: stop_rx.clone(),
            load: load.clone(),
            me: i,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("gup-serve-{i}"))
            .spawn(move || {
                let _ = tx.send(worker.run(rt, listener));
            })?;
        done.push(rx);
    }
    // The listener closes once every worker has dropped its clone.
    drop(listener);
    let mut first_error = None;
    for rx in done {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(std::io::Error::other("a serving thread panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One serving thread: its runtime, its accept loop, and its share of the drain.
struct Worker {
    router: Router,
    /// Read once per accepted connection.
    limits: LiveLimits,
    tls: Option<Tls>,
    lean: Option<Lean>,
    fast: Option<Arc<dyn FastPath>>,
    /// Connections per client address, all workers together
    /// (`limits.max_connections_per_address`).
    per_address: Arc<PerAddress>,
    on_refused: Option<Refusals>,
    /// Open connections, all workers together (`limits.max_connections`); the drain at
    /// shutdown waits for it to reach 0.
    open: Arc<Connections>,
    stop: watch::Receiver<bool>,
    /// Open connections per thread, and which one is this thread's.
    load: Arc<[AtomicUsize]>,
    me: usize,
    /// Every serving thread's runtime, to hand a connection to the least loaded one.
    handles: Arc<[tokio::runtime::Handle]>,
}

impl Worker {
    fn run(
        self,
        rt: tokio::runtime::Runtime,
        listener: std::net::TcpListener,
    ) -> std::io::Result<()> {
        let result = rt.block_on(self.serve(listener));
        // Blocking reads still running get a moment; nothing waits on them any more.
        rt.shutdown_timeout(Duration::from_secs(1));
        result
    }

    async fn serve(self, listener: std::net::TcpListener) -> std::io::Result<()> {
        // Accepted sockets are registered only with the reactor of the thread that serves
        // them, so the listener is watched for readiness and accepted from directly.
        listener.set_nonblocking(true)?;
        let listener = crate::sys::register_listener(listener)?;
        let Worker {
            router,
            limits: live,
            tls,
            lean,
            fast,
            per_address,
            on_refused,
            open,
            stop: stop_rx,
            load,
            me,
            handles,
        } = self;
        let mut stop = stop_rx.clone();
        let mut refused_logged = false;
        loop {
            let (stream, peer) = tokio::select! {
                ready = listener.readable() => {
                    let mut ready = ready?;
                    match ready.try_io(|l| crate::sys::accept_nonblocking(l.get_ref())) {
                        Ok(Ok(a)) => a,
                        Ok(Err(e)) => {
                            // Out of file descriptors and the like: back off instead of
                            // spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        // Another thread took it first; readiness is cleared, wait again.
                        Err(_would_block) => continue,
                    }
                }
                _ = stop.changed() => break,
            };
            let refuse = |limit: &'static str| {
                if let Some(count) = &on_refused {
                    count(limit);
                }
            };
            // The limits this connection lives by, whatever a reload sets later.
            let limits = live.get();
            let Some(place) = open.take(limits.max_connections) else {
                // Refused cleanly: closed at once; the connections already open carry on.
                if !refused_logged {
                    tracing::warn!(
                        max = limits.max_connections,
                        "at limits.max_connections; refusing new connections"
                    );
                    refused_logged = true;
                }
                refuse("max_connections");
                drop(stream);
                continue;
            };
            let Some(address) =
                per_address.take_within(peer.ip(), limits.max_connections_per_address)
            else {
                // One address may not take every place: closed at once, others carry on.
                tracing::debug!(%peer, "at limits.max_connections_per_address; refusing");
                refuse("max_connections_per_address");
                drop(stream);
                continue;
            };
            refused_logged = false;
            let _ = stream.set_nodelay(true);
            // Balance: whichever thread accepts first takes the connection (an idle one wakes
            // first), but it is served by the thread with the fewest open connections when
            // this one is ahead by more than one: a burst of connects must neither land on
            // one thread nor wait for a busy thread to come round to accept.
            let target = {
                let mine = load[me].load(Ordering::Relaxed);
                let (least, fewest) = (0..load.len())
                    .map(|i| (i, load[i].load(Ordering::Relaxed)))
                    .min_by_key(|(_, n)| *n)
                    .unwrap_or((me, mine));
                if mine > fewest + 1 {
                    least
                } else {
                    me
                }
            };
            load[target].fetch_add(1, Ordering::Relaxed);
            let conn = Conn {
                slot: Slot {
                    _place: place,
                    load: load.clone(),
                    me: target,
                    _address: Some(address),
                },
                peer,
                router: router.clone(),
                limits,
                tls: tls.clone(),
                lean,
                fast: fast.clone(),
                stop: stop_rx.clone(),
            };
            // Accepted non-blocking; registered with the serving thread's reactor once it runs
            // there.
            handles[target].spawn(async move {
                if let Ok(stream) = TcpStream::from_std(stream) {
                    conn.serve(stream).await;
                }
            });
        }
        // Stop accepting, then let this thread's connections finish (the count of all
        // threads' connections at 0 means every connection is done).
        drop(listener);
        let drained = async {
            while open.open() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(DRAIN, drained).await.is_err() {
            tracing::warn!("responses still running after {DRAIN:?}; cutting them");
        }
        Ok(())
    }
}

/// An accepted connection and what serving it needs.
struct Conn {
    slot: Slot,
    peer: std::net::SocketAddr,
    router: Router,
    /// The snapshot taken when it was accepted, for its whole life.
    limits: Arc<Limits>,
    tls: Option<Tls>,
    lean: Option<Lean>,
    fast: Option<Arc<dyn FastPath>>,
    stop: watch::Receiver<bool>,
}

impl Conn {
    /// Serves the connection on the thread this runs on, until it closes.
    async fn serve(self, stream: TcpStream) {
        let Conn {
            slot,
            peer,
            router,
            limits,
            tls,
            lean,
            fast,
            mut stop,
        } = self;
        let stream = Guarded::new(slot, stream);
        // Over TLS the fast path answers inside the session (the handshake first).
        let fast_tls = tls.as_ref().and(fast.clone());
        // The task holds only boxes: an idle connection costs what its way of being served
        // needs, not what the largest way (or the TLS handshake) needs.
        let serving: Pin<Box<dyn Future<Output = ()> + Send + '_>> = {
            let Some(way) = Box::pin(classify(stream, tls, lean, fast, &limits)).await else {
                return;
            };
            match way {
                Way::Tls(stream) => match fast_tls {
                    Some(fast) => Box::pin(serve_fast_tls(
                        stream, fast, peer, router, &limits, &mut stop,
                    )),
                    None => Box::pin(serve_hyper(*stream, peer, router, &limits, &mut stop)),
                },
                // Plain TCP: mapped blob bytes go out with sendfile.
                Way::Plain(stream) => Box::pin(serve_hyper(
                    stream.map(crate::sys::zerocopy::Stream::new),
                    peer,
                    router,
                    &limits,
                    &mut stop,
                )),
                Way::Fast(stream, fast) => Box::pin(serve_fast(
                    stream, fast, lean, peer, router, &limits, &mut stop,
                )),
                Way::Push(stream) => Box::pin(serve_push(stream, peer, router, &limits, &mut stop)),
            }
        };
        serving.await;
    }
}

/// Connections the kernel may queue before they are accepted (capped by
/// `net.core.somaxconn`, 4096 on current Linux). nginx defaults to 511; a node whose clients
/// all reconnect at once (after a restart, or at a release) wants more.
const LISTEN_BACKLOG: i32 = 4096;

/// How an accepted connection is served.
enum Way {
    /// TLS, handshake done (boxed: a rustls connection is large).
    Tls(Box<tokio_rustls::server::TlsStream<Guarded<TcpStream>>>),
    /// Plain HTTP through hyper.
    Plain(Guarded<TcpStream>),
    /// Plain TCP whose first bytes the [`Lean`] test matched: served by [`super::pushconn`],
    /// without hyper's per-connection buffers.
    Push(Guarded<TcpStream>),
    /// Plain TCP with a [`FastPath`]: [`super::fastconn`] reads the first bytes itself and
    /// tells push streams apart from them (no peek, no timer of its own).
    Fast(Guarded<TcpStream>, Arc<dyn FastPath>),
}

/// Finishes the TLS handshake, or peeks at the first bytes of a plain connection, within
/// `limits.header_read_timeout`. `None` when the peer sent nothing usable in time.
async fn classify(
    stream: Guarded<TcpStream>,
    tls: Option<Tls>,
    lean: Option<Lean>,
    fast: Option<Arc<dyn FastPath>>,
    limits: &Limits,
) -> Option<Way> {
    if let Some(acceptor) = tls {
        let accepted =
            tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
        return match accepted {
            Ok(Ok(tls_stream)) => Some(Way::Tls(Box::new(tls_stream))),
            _ => None,
        };
    }
    if let Some(fast) = fast {
        return Some(Way::Fast(stream, fast));
    }
    let Some(lean) = lean else {
        return Some(Way::Plain(stream));
    };
    let mut first = [0u8; 64];
    let want = lean.peek.min(first.len());
    let peeked = tokio::time::timeout(
        limits.header_read_timeout,
        stream.get_ref().peek(&mut first[..want]),
    )
    .await;
    match peeked {
        Ok(Ok(n)) if (lean.matches)(&first[..n]) => Some(Way::Push(stream)),
        Ok(Ok(_)) => Some(Way::Plain(stream)),
        _ => None,
    }
}

/// A push stream until it ends, or until [`DRAIN`] after shutdown began (its body ends at
/// shutdown; this bounds the rest).
async fn serve_push(
    stream: Guarded<TcpStream>,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) {
    serve_push_read(stream, Vec::new(), peer, router, limits, stop).await
}

/// As [`serve_push`], for a stream whose first bytes `read` were already read from it.
async fn serve_push_read(
    stream: Guarded<TcpStream>,
    read: Vec<u8>,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) {
    let serve = super::pushconn::serve(stream, read, peer, router, limits);
    tokio::pin!(serve);
    tokio::select! {
        _ = &mut serve => {}
        _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
            // Boxed: a timer in every idle stream's state would cost more than the stream.
            let _ = Box::pin(tokio::time::timeout(DRAIN, serve)).await;
        }
    }
}

/// Serves a plain connection's requests that `fast` answers itself, then (at the first it
/// declines) the rest of the connection with hyper; a push stream (`lean`) as a push stream.
async fn serve_fast(
    stream: Guarded<TcpStream>,
    fast: Arc<dyn FastPath>,
    lean: Option<Lean>,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) {
    use super::fastconn::Ended;
    let ended = super::fastconn::serve(
        stream.map(crate::sys::zerocopy::Stream::new),
        &*fast,
        lean.map(|l| (l.peek, l.matches)),
        limits.max_header_bytes,
        limits.header_read_timeout,
        stop,
    )
    .await;
    match ended {
        // Dropped: the slot goes first, then the socket closes (a FIN, as hyper's shutdown
        // sends, one system call fewer).
        Ended::Closed | Ended::Done(_) => {}
        // Boxed, as the push stream below: what an idle connection holds is what its way of
        // being served needs.
        Ended::ToHyper(stream) => Box::pin(serve_hyper(stream, peer, router, limits, stop)).await,
        Ended::Lean(read, stream) => {
            let stream = stream.map(crate::sys::zerocopy::Stream::into_inner);
            Box::pin(serve_push_read(stream, read, peer, router, limits, stop)).await
        }
    }
}

/// As [`serve_fast`] inside a TLS session (no push streams: over TLS they are hyper's). A
/// session the fast path ends sends its `close_notify` (within
/// `limits.header_read_timeout`), as hyper's shutdown does.
///
/// Measured reason (issue 23): TLS 1.3, 1 KiB at 200 connections, gup 1.07x-1.16x nginx with
/// every request through hyper; the same per-request costs the fast path removes on plain
/// connections are there under the encryption.
async fn serve_fast_tls(
    stream: Box<tokio_rustls::server::TlsStream<Guarded<TcpStream>>>,
    fast: Arc<dyn FastPath>,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) {
    use super::fastconn::Ended;
    use tokio::io::AsyncWriteExt;
    let ended = super::fastconn::serve(
        stream,
        &*fast,
        None,
        limits.max_header_bytes,
        limits.header_read_timeout,
        stop,
    )
    .await;
    match ended {
        Ended::Closed | Ended::Lean(..) => {}
        Ended::Done(mut stream) => {
            let _ = tokio::time::timeout(limits.header_read_timeout, stream.shutdown()).await;
        }
        Ended::ToHyper(stream) => Box::pin(serve_hyper(stream, peer, router, limits, stop)).await,
    }
}

/// Serves a connection with hyper, the router's handlers seeing the peer address as
/// `ConnectInfo<SocketAddr>`.
async fn serve_hyper<I>(
    io: I,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = tower::ServiceBuilder::new()
        // A body that stalls is cut after this much silence, not held without end.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            limits.body_read_timeout,
        ))
        .map_request(
            move |mut req: axum::http::Request<
                tower_http::timeout::TimeoutBody<hyper::body::Incoming>,
            >| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        )
        .service(router);
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        // A client that shuts its sending side after the request still gets the answer.
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    drive(conn, stop).await;
}

/// Serves one connection; at shutdown lets its in-flight response finish, then closes it.
async fn drive<C>(conn: C, stop: &mut watch::Receiver<bool>)
where
    C: Future<Output = Result<(), hyper::Error>> + GracefulConnection,
{
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().shutdown_gracefully();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().shutdown_gracefully();
                }
            }
        }
    }
}

/// hyper's per-connection graceful shutdown, behind one name for plain and TLS streams.
trait GracefulConnection {
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Running = tokio::task::JoinHandle<std::io::Result<()>>;

    /// `router` served on two threads on 127.0.0.1 with at most `max_connections`: its
    /// address, the sender that stops it, and the running server.
    async fn serve_on_loopback(
        router: Router,
        max_connections: usize,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        Running,
    ) {
        serve_lean(router, max_connections, None).await
    }

    /// As [`serve_on_loopback`], with connections that `lean` matches served as push streams.
    async fn serve_lean(
        router: Router,
        max_connections: usize,
        lean: Option<Lean>,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        Running,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = Serving {
            limits: LiveLimits::new(Limits {
                max_header_bytes: 8192,
                header_read_timeout: Duration::from_secs(5),
                max_connections,
                threads: 2,
                max_connections_per_address: 0,
                body_read_timeout: Duration::from_secs(5),
                stream_write_timeout: Duration::from_secs(1),
            }),
            tls: None,
            lean,
            fast: None,
            on_refused: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            listener,
            router,
            async {
                let _ = stop_rx.await;
            },
            serving,
        ));
        (addr, stop_tx, server)
    }

    /// A burst of connections is spread over the serving threads, whichever thread accepts
    /// them: each connection asks which thread serves it.
    #[tokio::test]
    async fn a_burst_of_connections_is_served_by_every_thread() {
        let router = Router::new().route(
            "/thread",
            axum::routing::get(|| async {
                std::thread::current().name().unwrap_or("?").to_string()
            }),
        );
        let (addr, stop_tx, server) = serve_on_loopback(router, 64).await;
        // All connected before any asks, and all held open until every answer is in.
        let mut conns = Vec::new();
        for _ in 0..8 {
            conns.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut served = std::collections::HashMap::<String, usize>::new();
        for conn in &mut conns {
            conn.write_all(b"GET /thread HTTP/1.1\r\nhost: t\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = 0;
            let name = loop {
                let n = conn.read(&mut buf[got..]).await.unwrap();
                assert!(n > 0, "connection closed before the answer");
                got += n;
                let text = String::from_utf8_lossy(&buf[..got]).to_string();
                if let Some(name) = text.split("\r\n\r\n").nth(1).filter(|b| b.len() >= 11) {
                    break name.to_string();
                }
            };
            *served.entry(name).or_default() += 1;
        }
        assert_eq!(served.len(), 2, "both threads serve: {served:?}");
        assert!(
            served.values().all(|n| *n >= 3),
            "no thread takes more than its share plus one: {served:?}"
        );
        drop(conns);
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    /// A connection's place under `max_connections` is free by the time its client sees the
    /// close: at a limit of one connection, each new connection made right after the previous
    /// one was seen to close is served.
    #[tokio::test]
    async fn a_closed_connections_slot_is_free_once_its_client_sees_the_close() {
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (addr, stop_tx, server) = serve_on_loopback(router, 1).await;
        for i in 0..200 {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await.unwrap();
            let text = String::from_utf8_lossy(&answer);
            assert!(
                text.starts_with("HTTP/1.1 200"),
                "connection {i} was refused after the previous one closed: {text:?}"
            );
        }
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    /// One kept-alive `GET /` on `conn`: the answer's head, or None when the server closed
    /// the connection without answering (a refused connection).
    async fn ask(conn: &mut TcpStream) -> Option<String> {
        // A refused connection may be reset before the request is written: its read says so.
        let _ = conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").await;
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
            match read.expect("neither an answer nor a close within 10 s") {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, "ok")) = text.split_once("\r\n\r\n") {
                return Some(head.to_string());
            }
        }
    }

    /// A new connection that is served: retried for at most 10 s, since a connection its
    /// client closed is counted as gone once the server has read the close.
    async fn admitted(addr: std::net::SocketAddr) -> TcpStream {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            if ask(&mut conn).await.is_some() {
                return conn;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new connection served within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new connection is closed without an answer.
    async fn refused(addr: std::net::SocketAddr, why: &str) {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert_eq!(ask(&mut conn).await, None, "{why}");
    }

    /// `max_connections` lowered while connections are open (a reload): none of them is
    /// closed and each still answers, new ones are refused until the count falls below the
    /// new bound, and raising it admits new ones again.
    #[tokio::test]
    async fn a_lowered_max_connections_keeps_open_ones_refuses_new_ones_and_a_raised_one_admits() {
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = |max_connections| Limits {
            max_header_bytes: 8192,
            header_read_timeout: Duration::from_secs(30),
            max_connections,
            threads: 2,
            max_connections_per_address: 0,
            body_read_timeout: Duration::from_secs(5),
            stream_write_timeout: Duration::from_secs(1),
        };
        let live = LiveLimits::new(limits(4));
        let serving = Serving {
            limits: live.clone(),
            tls: None,
            lean: None,
            fast: None,
            on_refused: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            listener,
            router,
            async {
                let _ = stop_rx.await;
            },
            serving,
        ));
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(admitted(addr).await);
        }
        refused(addr, "a fifth is over the bound of 4").await;
        live.set(limits(2));
        for conn in &mut open {
            assert!(ask(conn).await.is_some(), "an open connection carries on");
        }
        refused(addr, "four open, bound 2").await;
        // Three close: one open, room for one more.
        open.truncate(1);
        open.push(admitted(addr).await);
        refused(addr, "two open, bound 2").await;
        live.set(limits(8));
        for _ in 0..6 {
            open.push(admitted(addr).await);
        }
        refused(addr, "eight open, bound 8").await;
        for conn in &mut open {
            assert!(ask(conn).await.is_some());
        }
        drop(open);
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    /// Push streams for these tests: any request for `/stream...`.
    fn lean_streams() -> Option<Lean> {
        Some(Lean {
            peek: 11,
            matches: |first| first.starts_with(b"GET /stream"),
        })
    }

    /// A push client that stops reading is closed once a write has waited
    /// `stream_write_timeout` (1 s here), not held with its buffers for ever.
    #[tokio::test]
    async fn a_push_client_that_does_not_read_is_closed() {
        let endless = futures_util::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 16 << 10]))
        });
        let router = Router::new().route(
            "/stream",
            axum::routing::get(move || async move { axum::body::Body::from_stream(endless) }),
        );
        let (addr, stop_tx, server) = serve_lean(router, 8, lean_streams()).await;
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut conn: std::net::TcpStream = socket.into();
        std::io::Write::write_all(&mut conn, b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
        // Not reading: the server's writes stall.
        tokio::time::sleep(Duration::from_secs(3)).await;
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let read = tokio::task::spawn_blocking(move || {
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut conn, &mut sink).map(|_| sink.len())
        })
        .await
        .unwrap();
        let got = read.expect("the server closed the stalled stream (EOF before the read timeout)");
        assert!(got > 0);
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }

    /// An HTTP/1.0 push client, which knows no chunked encoding, gets its body until the
    /// connection closes.
    #[tokio::test]
    async fn an_http_1_0_push_client_gets_its_body_until_the_close() {
        let router = Router::new().route(
            "/stream",
            axum::routing::get(|| async {
                let parts = ["event: a\n", "data: 1\n\n"]
                    .map(|p| Ok::<_, std::io::Error>(bytes::Bytes::from_static(p.as_bytes())));
                axum::body::Body::from_stream(futures_util::stream::iter(parts))
            }),
        );
        let (addr, stop_tx, server) = serve_lean(router, 8, lean_streams()).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /stream HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert_eq!(body, "event: a\ndata: 1\n\n");
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
