//! Shutdown as a value: one [`Shutdown`] is cloned into every task; the gateway triggers it once
//! and each task sees it at its next await point. `/readyz` turns 503 as soon as it is
//! triggered, so load balancers stop sending work while connections drain.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
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

    pub fn wait_owned(&self) -> impl Future<Output = ()> + Send + use<> {
        self.0.clone().cancelled_owned()
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

/// A future that is polled only when it asked to be: at first, and after its own waker fired.
/// A connection's loop polls its stop signal beside its reads and writes every turn of its
/// `select!`, and a cancellation token's wait takes the token's lock at each poll (under
/// callgrind, ~480 instructions of a QoS 1 message, ~210 of a QoS 0 one, and a lock every
/// connection shares). Between wake-ups this is an atomic swap.
pub struct Quiet<F> {
    fut: Pin<Box<F>>,
    gate: Arc<Gate>,
    /// The waker `fut` is polled with: it marks the gate, then wakes the task.
    waker: Waker,
}

#[derive(Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Quiet<F> {
    pub fn new(fut: F) -> Self {
        let gate = Arc::new(Gate::default());
        // Polled the first time, so that it registers what wakes it.
        gate.woken.store(true, Ordering::Relaxed);
        Quiet {
            fut: Box::pin(fut),
            waker: Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: Future> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake-up after the read wakes this task again.
        this.gate.task.register(cx.waker());
        if !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signal is seen once triggered, whether the wait was polled before or not, and a
    /// wait polled many times in between never misses it.
    #[tokio::test]
    async fn a_quiet_wait_sees_the_trigger() {
        let shutdown = Shutdown::new();
        let mut wait = Quiet::new(shutdown.wait_owned());
        for _ in 0..3 {
            assert!(futures_util::poll!(&mut wait).is_pending());
        }
        let trigger = shutdown.clone();
        tokio::spawn(async move { trigger.trigger() });
        tokio::time::timeout(std::time::Duration::from_secs(5), &mut wait)
            .await
            .expect("the wait ends once shutdown is triggered");
        // Made after the trigger: ready at its first poll.
        let late = Quiet::new(shutdown.wait_owned());
        assert!(futures_util::poll!(late).is_ready());
    }
}
