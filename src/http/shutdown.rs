//! Shutdown: one signal many tasks wait on, and the process signals that start it.
//!
//! Owns the [`Shutdown`] watch (cheap to clone, resolves once shutdown began) and the SIGTERM
//! and SIGINT handling of the binary. It must never decide what shutting down means for a
//! role: each role stops its own work when the signal resolves.

use tokio::sync::watch;

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

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    signals().await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C), with both handlers installed when this is called
/// (inside a runtime), not when the future is first polled: a Ctrl-C a moment after start
/// must stop the process gracefully, never kill it with the default action.
pub fn signals() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(_)) => {
                term.recv().await;
            }
            (Err(_), Ok(mut int)) => {
                int.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending::<()>().await,
        }
        tracing::info!("shutdown requested");
    }
}
