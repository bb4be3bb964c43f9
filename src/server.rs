//! Running an HTTP server on a listener the caller bound, until a shutdown future resolves.
//!
//! Owns the accept loop shape every role uses (`run(listener, router, shutdown)`, after
//! mini-redis), graceful shutdown with a bounded drain, the process-wide open-file limit, and
//! the shutdown signal (SIGTERM/SIGINT) of the binary. It must never know routes or roles.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long in-flight responses get to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// A shutdown signal many tasks can wait on. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending half: `trigger` starts shutdown everywhere.
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

/// A new shutdown pair.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl Shutdown {
    /// Resolves once shutdown has started.
    pub async fn wait(mut self) {
        while !*self.rx.borrow() {
            if self.rx.changed().await.is_err() {
                // The trigger is gone: nobody can shut us down any more, so never resolve.
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Connection limits of a server (`[limits]` in the config files).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers); beyond it, 431.
    pub max_header_bytes: usize,
    /// A client that has not sent a whole request head this long after it connected (or
    /// after its previous response) is disconnected: half-open connections do not pile up.
    pub header_read_timeout: Duration,
    /// Connections beyond this many are closed at once, while the others carry on.
    pub max_connections: usize,
    /// Serving threads, each with its own runtime (at least 1).
    pub threads: usize,
}

/// TLS for a listener: the port then speaks only TLS.
pub type Tls = tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate and key do not fit together: {0}")]
    Config(String),
}

/// A TLS acceptor from PEM files (certificate chain, private key).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, TlsError> {
    let file_err = |p: &std::path::Path, reason: String| TlsError::File {
        path: p.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| file_err(cert, e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| file_err(key, e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no PEM certificate in it".into()));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| file_err(key, e.to_string()))?
        .ok_or_else(|| file_err(key, "no PEM private key in it".into()))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Serves `router` on `listener` until `shutdown`, then drains for at most [`DRAIN`].
///
/// Connections are served on `limits.threads` threads, each with its own single-threaded
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
    limits: Limits,
    tls: Option<Tls>,
) -> std::io::Result<()> {
    use std::sync::Arc;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let listener = listener.into_std()?;
    // Listening again only deepens the queue of connections not yet accepted (tokio binds
    // with 128): 1,000 clients connecting at once overflowed it, and each dropped SYN cost its
    // client a 1 s retransmit (wrk's p99 at 1,000 connections went from ~15 ms to ~1.2 s).
    socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG)?;
    let threads = limits.threads.max(1);
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
            slots: slots.clone(),
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
    limits: Limits,
    tls: Option<Tls>,
    /// Connection slots all workers share (`limits.max_connections`).
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    stop: watch::Receiver<bool>,
    /// Open connections per thread, and which one is this thread's.
    load: std::sync::Arc<[AtomicUsize]>,
    me: usize,
    /// Every serving thread's runtime, to hand a connection to the least loaded one.
    handles: std::sync::Arc<[tokio::runtime::Handle]>,
}

/// Counts a connection against its thread while it lives.
struct Open {
    load: std::sync::Arc<[AtomicUsize]>,
    me: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.load[self.me].fetch_sub(1, Ordering::Relaxed);
    }
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
        // SAFETY: the listener owns its descriptor for as long as the AsyncFd owns the
        // listener, and `as_raw_fd` always returns that same descriptor.
        let listener = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                listener,
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        let Worker {
            router,
            limits,
            tls,
            slots,
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
                    match ready.try_io(|l| l.get_ref().accept()) {
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Refused cleanly: closed at once; the connections already open carry on.
                if !refused_logged {
                    tracing::warn!(
                        max = limits.max_connections,
                        "at limits.max_connections; refusing new connections"
                    );
                    refused_logged = true;
                }
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
                permit,
                open: Open {
                    load: load.clone(),
                    me: target,
                },
                peer,
                router: router.clone(),
                limits: limits.clone(),
                tls: tls.clone(),
                stop: stop_rx.clone(),
            };
            // Registered with the serving thread's reactor once it runs there.
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::debug!(error = %e, "setting up an accepted connection failed");
                continue;
            }
            handles[target].spawn(async move {
                if let Ok(stream) = TcpStream::from_std(stream) {
                    conn.serve(stream).await;
                }
            });
        }
        // Stop accepting, then let this thread's connections finish (all threads' share of
        // the slots coming back means every connection is done).
        drop(listener);
        let all = limits.max_connections.max(1);
        let drained = async {
            while slots.available_permits() < all {
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
    permit: tokio::sync::OwnedSemaphorePermit,
    open: Open,
    peer: std::net::SocketAddr,
    router: Router,
    limits: Limits,
    tls: Option<Tls>,
    stop: watch::Receiver<bool>,
}

impl Conn {
    /// Serves the connection on the thread this runs on, until it closes.
    async fn serve(self, stream: TcpStream) {
        let Conn {
            permit: _permit,
            open: _open,
            peer,
            router,
            limits,
            tls,
            mut stop,
        } = self;
        // The task holds only boxes: an idle connection costs what its way of being served
        // needs, not what the largest way (or the TLS handshake) needs.
        let serving: Pin<Box<dyn Future<Output = ()> + Send + '_>> = {
            let Some(way) = Box::pin(classify(stream, tls, &limits)).await else {
                return;
            };
            match way {
                Way::Tls(stream) => {
                    Box::pin(serve_hyper(*stream, peer, router, &limits, &mut stop))
                }
                // Plain TCP: mapped blob bytes go out with sendfile.
                Way::Plain(stream) => Box::pin(serve_hyper(
                    crate::zerocopy::Stream::new(stream),
                    peer,
                    router,
                    &limits,
                    &mut stop,
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
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Plain HTTP through hyper.
    Plain(TcpStream),
    /// Plain TCP whose first request is `GET /v1/stream`: served by [`crate::pushconn`],
    /// without hyper's per-connection buffers.
    Push(TcpStream),
}

/// Finishes the TLS handshake, or peeks at the first bytes of a plain connection, within
/// `limits.header_read_timeout`. `None` when the peer sent nothing usable in time.
async fn classify(stream: TcpStream, tls: Option<Tls>, limits: &Limits) -> Option<Way> {
    if let Some(acceptor) = tls {
        let accepted =
            tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
        return match accepted {
            Ok(Ok(tls_stream)) => Some(Way::Tls(Box::new(tls_stream))),
            _ => None,
        };
    }
    let mut first = [0u8; crate::pushconn::PEEK];
    let peeked = tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut first)).await;
    match peeked {
        Ok(Ok(n)) if crate::pushconn::is_stream_request(&first[..n]) => Some(Way::Push(stream)),
        Ok(Ok(_)) => Some(Way::Plain(stream)),
        _ => None,
    }
}

/// A push stream until it ends, or until [`DRAIN`] after shutdown began (its body ends at
/// shutdown; this bounds the rest).
async fn serve_push(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    limits: &Limits,
    stop: &mut watch::Receiver<bool>,
) {
    let serve = crate::pushconn::serve(
        stream,
        peer,
        router,
        limits.max_header_bytes,
        limits.header_read_timeout,
    );
    tokio::pin!(serve);
    tokio::select! {
        _ = &mut serve => {}
        _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
            // Boxed: a timer in every idle stream's state would cost more than the stream.
            let _ = Box::pin(tokio::time::timeout(DRAIN, serve)).await;
        }
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
        .map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        )
        .service(router);
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
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

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}

/// The open-file (soft) limit now in force.
pub fn open_file_limit() -> u64 {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        1024
    }
}

/// Raises the soft open-file limit to the hard one, so that many push streams fit.
/// Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return 0;
            }
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    return want.rlim_cur;
                }
            }
        }
        lim.rlim_cur
    }
    #[cfg(not(unix))]
    {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_header_bytes: 8192,
            header_read_timeout: Duration::from_secs(5),
            max_connections: 64,
            threads: 2,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            listener,
            router,
            async {
                let _ = stop_rx.await;
            },
            limits,
            None,
        ));
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
}
