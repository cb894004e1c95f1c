//! Shutdown: one trigger, many listeners.
//!
//! SIGTERM (docker stop) or SIGINT (Ctrl-C) fires the trigger. Every task holds a [`Shutdown`]
//! and stops taking new input when it fires, then flushes; `main` gives the whole process a
//! grace period to finish before it exits anyway.

use tokio::sync::watch;

/// The listening side. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The firing side.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl ShutdownTrigger {
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    /// A shutdown that never fires, for tests and tools.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive for the life of the process, so `wait` pends forever rather
        // than returning on a closed channel.
        std::mem::forget(tx);
        Self { rx }
    }

    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is requested (or every trigger is gone, which means the same).
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger was dropped: nobody can ask us to keep running.
        let _closed_means_shutdown = rx.wait_for(|v| *v).await;
    }
}

/// Fire `trigger` on SIGTERM or SIGINT. Returns the signal's name.
pub async fn fire_on_signal(trigger: &ShutdownTrigger) -> &'static str {
    let name = wait_for_signal().await;
    tracing::info!(signal = name, "Shutting down.");
    trigger.fire();
    name
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %crate::telemetry::chain(&e), "Cannot install signal handlers; only Ctrl-C will stop this process.");
            let _ctrl_c = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ctrl_c = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_sees_the_trigger() {
        let (trigger, a) = channel();
        let b = a.clone();
        assert!(!a.is_requested());
        let waiter = tokio::spawn(async move { b.wait().await });
        trigger.fire();
        waiter.await.unwrap();
        assert!(a.is_requested());
        assert!(trigger.subscribe().is_requested());
    }
}
