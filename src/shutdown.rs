//! Shutdown as a value: one [`Shutdown`] is cloned into every task; the gateway triggers it once
//! and each task sees it at its next await point. `/readyz` turns 503 as soon as it is
//! triggered, so load balancers stop sending work while connections drain.

use std::future::Future;

use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Shutdown(CancellationToken::new())
    }

    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Completes once shutdown was triggered.
    pub async fn wait(&self) {
        self.0.cancelled().await
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called,
/// not when the future is first polled: called before the gateway starts, a signal that arrives
/// while it is still starting (its listeners already open) shuts it down once started, where
/// the default action would have killed it.
#[cfg(unix)]
pub fn signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let on = |kind: SignalKind, name: &'static str| {
        let installed = signal(kind);
        async move {
            match installed {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let (int, term) = (
        on(SignalKind::interrupt(), "SIGINT"),
        on(SignalKind::terminate(), "SIGTERM"),
    );
    async move {
        tokio::select! {
            _ = int => tracing::info!("SIGINT received, shutting down"),
            _ = term => tracing::info!("SIGTERM received, shutting down"),
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
pub fn signal() -> impl Future<Output = ()> + Send {
    let ctrl_c = tokio::signal::windows::ctrl_c();
    async move {
        match ctrl_c {
            Ok(mut c) => {
                c.recv().await;
                tracing::info!("Ctrl-C received, shutting down");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}
