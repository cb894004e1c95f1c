//! A service's long-running tasks — one per serial port, one per Modbus bus — and the one
//! policy that watches them.
//!
//! Each worker runs until shutdown and handles its own trouble (a port that vanishes is
//! reopened with backoff, a reading the journal refuses is counted and the next one tried), so
//! one device's trouble never reaches another's. A worker that ends before shutdown anyway is
//! a bug: its device's readings have stopped, which is logged as an ERROR naming the worker,
//! and the service goes on serving the others (stopping would stop every device for one).
//! At shutdown every worker is waited for, so the readings they hold reach their journal.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

use crate::Shutdown;

/// The workers of one kind (`"serial port"`, `"bus"`), by name.
#[derive(Debug)]
pub struct Workers {
    kind: &'static str,
    set: JoinSet<()>,
    names: HashMap<Id, String>,
}

impl Workers {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// Start `task` as the worker called `name` (a port's path, a bus's name).
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name.into());
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Watch the workers until `shutdown`, then wait for every one of them to end.
    pub async fn supervise(mut self, shutdown: &Shutdown) {
        loop {
            tokio::select! {
                // Shutdown first: workers end on it too, and one that ended because of it has
                // not "ended before shutdown". With no worker left the other branch is
                // disabled, and this one waits.
                biased;
                () = shutdown.wait() => break,
                Some(ended) = self.set.join_next_with_id() => {
                    // Checked again: a worker seen to end in the same wake-up as the shutdown
                    // ended because of it.
                    self.ended(ended, !shutdown.is_requested());
                }
            }
        }
        while let Some(ended) = self.set.join_next_with_id().await {
            self.ended(ended, false);
        }
    }

    fn ended(&mut self, ended: Result<(Id, ()), JoinError>, early: bool) {
        let id = match &ended {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.remove(&id).unwrap_or_default();
        let kind = self.kind;
        match ended {
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                tracing::error!(worker = kind, name = %name, error = %crate::telemetry::chain(&e), "A {kind} task ended abnormally; its readings have stopped.");
            }
            Ok(_) if early => {
                tracing::error!(worker = kind, name = %name, "A {kind} task ended before shutdown; its readings have stopped.");
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn every_worker_is_waited_for_after_shutdown_even_one_that_ended_early() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let finished = Arc::new(AtomicUsize::new(0));
        let mut workers = Workers::new("test");
        // One ends at once (a bug: logged, the others go on).
        let f = finished.clone();
        workers.spawn("early", async move {
            f.fetch_add(1, Ordering::SeqCst);
        });
        // Two run until shutdown and then still have work to finish.
        for name in ["a", "b"] {
            let (f, s) = (finished.clone(), shutdown.clone());
            workers.spawn(name, async move {
                s.wait().await;
                tokio::task::yield_now().await;
                f.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(workers.len(), 3);
        let supervisor = tokio::spawn({
            let s = shutdown.clone();
            async move { workers.supervise(&s).await }
        });
        // The early one ends; the supervisor keeps watching the others.
        while finished.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        assert!(!supervisor.is_finished());
        trigger.fire();
        supervisor.await.unwrap();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            3,
            "supervise returned before a worker ended"
        );
    }

    #[tokio::test]
    async fn with_no_workers_it_waits_for_shutdown() {
        let (trigger, shutdown) = crate::shutdown::channel();
        let workers = Workers::new("test");
        assert!(workers.is_empty());
        let supervisor = tokio::spawn({
            let s = shutdown.clone();
            async move { workers.supervise(&s).await }
        });
        tokio::task::yield_now().await;
        assert!(!supervisor.is_finished());
        trigger.fire();
        supervisor.await.unwrap();
    }
}
