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
    tracing::info!("shutdown requested");
}
