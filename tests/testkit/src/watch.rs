//! What a test sees of the bus: a [`Watch`] (a reader) and a [`Sink`] (a sink group).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proto::{Filter, Payload, Segment, Sequenced};
use runtime::bus::{Bus, Message, Overflow, QoS};
use runtime::config::InboxConfig;
use runtime::delivery::Inbox;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{TestBroker, WATCH_USER, seg};

/// How long a subscription may take to be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything published on one filter, decoded, as a reader sees it: no acknowledgements, so
/// it changes nothing a producer or sink does.
pub struct Watch<T> {
    rx: mpsc::Receiver<Message>,
    bus: Bus,
    task: JoinHandle<()>,
    _payload: std::marker::PhantomData<fn() -> T>,
}

impl<T: Payload + Debug> Watch<T> {
    /// Subscribes `filter` as [`WATCH_USER`] and returns once the broker confirmed it, so
    /// nothing published after this is missed. Each watch has a client id of its own.
    ///
    /// # Panics
    ///
    /// When it cannot connect or subscribe within 10 s.
    pub async fn new(broker: &TestBroker, site: &Segment, filter: &Filter<T>) -> Watch<T> {
        static N: AtomicU32 = AtomicU32::new(0);
        let instance = format!("{WATCH_USER}-{}", N.fetch_add(1, Ordering::Relaxed));
        let (bus, task) = broker.connect_as(site, WATCH_USER, &instance).await;
        let rx = bus.subscribe(filter.as_str(), QoS::AtLeastOnce, Overflow::Wait);
        assert!(
            bus.wait_subscribed(SUBSCRIBE_TIMEOUT).await,
            "the broker did not confirm {WATCH_USER}'s subscription to {}",
            filter.as_str()
        );
        Watch {
            rx,
            bus,
            task,
            _payload: std::marker::PhantomData,
        }
    }

    /// The next message and its topic, if one comes within `wait`.
    ///
    /// # Panics
    ///
    /// When its payload is not a valid `T`: whatever published it broke the contract.
    pub async fn next_with_topic(&mut self, wait: Duration) -> Option<(String, T)> {
        let msg = tokio::time::timeout(wait, self.rx.recv()).await.ok()??;
        match T::decode(&msg.payload) {
            Ok(value) => Some((msg.topic, value)),
            Err(e) => panic!(
                "a payload on {} is not a valid {}: {e}: {:?}",
                msg.topic,
                T::NAME,
                String::from_utf8_lossy(&msg.payload)
            ),
        }
    }

    /// The next message, if one comes within `wait`; see [`Watch::next_with_topic`].
    pub async fn next(&mut self, wait: Duration) -> Option<T> {
        self.next_with_topic(wait).await.map(|(_, v)| v)
    }

    /// Collects messages until `done` holds for all collected so far.
    ///
    /// # Panics
    ///
    /// When it does not hold within `wait`, showing the last messages collected.
    pub async fn until(&mut self, wait: Duration, done: impl FnMut(&[T]) -> bool) -> Vec<T> {
        self.collect(wait, done).await.1
    }

    /// [`Watch::until`], with each message's topic.
    pub async fn until_with_topics(
        &mut self,
        wait: Duration,
        done: impl FnMut(&[T]) -> bool,
    ) -> Vec<(String, T)> {
        let (topics, values) = self.collect(wait, done).await;
        topics.into_iter().zip(values).collect()
    }

    /// Everything that arrives within `wait`.
    pub async fn during(&mut self, wait: Duration) -> Vec<T> {
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(v) = self
            .next(end.saturating_duration_since(Instant::now()))
            .await
        {
            got.push(v);
        }
        got
    }

    /// Topics and values, apart, so that `done` sees the values as one slice.
    async fn collect(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&[T]) -> bool,
    ) -> (Vec<String>, Vec<T>) {
        let end = Instant::now() + wait;
        let (mut topics, mut values) = (Vec::new(), Vec::new());
        while !done(&values) {
            let left = end.saturating_duration_since(Instant::now());
            match self.next_with_topic(left).await {
                Some((topic, value)) => {
                    topics.push(topic);
                    values.push(value);
                }
                None => panic!(
                    "condition not met within {wait:?}; got {} messages, the last ones: {:#?}",
                    values.len(),
                    &values[values.len().saturating_sub(10)..]
                ),
            }
        }
        (topics, values)
    }

    /// Unsubscribes and disconnects.
    pub async fn close(self) {
        self.bus.close(self.task).await;
    }
}

/// A sink group that acknowledges every message as it arrives and hands it to the test: the
/// producers' journals drain as they do with influx-writer behind them, and what the group
/// received can be compared with what was sent.
///
/// Its user is the group (a sink's username is its sink group, docs/broker.md), with the
/// `sink` role, and it is registered on the bus like a real sink's, so producers whose streams
/// wait for the group keep their readings until it has them.
pub struct Sink<T> {
    rx: mpsc::UnboundedReceiver<T>,
    stop: Option<oneshot::Sender<()>>,
    forward: JoinHandle<()>,
    bus: Bus,
    bus_task: JoinHandle<()>,
}

impl<T: Sequenced + Send + 'static> Sink<T> {
    /// Subscribes `filter` as sink group `group` (a user of `broker` with the `sink` role) and
    /// returns once the broker confirmed the subscription.
    ///
    /// # Panics
    ///
    /// When it cannot connect or subscribe within 10 s.
    pub async fn start(
        broker: &TestBroker,
        site: &Segment,
        group: &str,
        filter: &Filter<T>,
    ) -> Sink<T> {
        let (bus, bus_task) = broker.connect(site, group).await;
        let (mut inbox, acks) =
            Inbox::<T>::subscribe(&bus, filter, &seg(group), &InboxConfig::default());
        assert!(
            bus.wait_subscribed(SUBSCRIBE_TIMEOUT).await,
            "the broker did not confirm sink {group}'s subscription to {}",
            filter.as_str()
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, mut stopped) = oneshot::channel();
        let forward = tokio::spawn(async move {
            let acker = inbox.acker();
            loop {
                let d = tokio::select! {
                    d = inbox.recv() => d,
                    _ = &mut stopped => None,
                };
                let Some(d) = d else { break };
                if let Some(token) = &d.token {
                    acker.ack(token);
                }
                // Acknowledged even when the test reads no more: a producer must not hold its
                // readings because the test already has what it needed.
                let _test_gone = tx.send(d.message);
            }
            // The acknowledgement task sends what is left once the inbox and its ackers are
            // gone, then ends.
            drop((inbox, acker));
            if let Err(e) = acks.await {
                panic!("the sink's acknowledgement task failed: {e}");
            }
        });
        Sink {
            rx,
            stop: Some(stop),
            forward,
            bus,
            bus_task,
        }
    }

    /// The next message received, if one comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<T> {
        tokio::time::timeout(wait, self.rx.recv()).await.ok()?
    }

    /// A message already received, if any.
    pub fn try_next(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Collects messages until `done` holds for all collected so far.
    ///
    /// # Panics
    ///
    /// When it does not hold within `wait`, showing the last messages collected.
    pub async fn until(&mut self, wait: Duration, mut done: impl FnMut(&[T]) -> bool) -> Vec<T>
    where
        T: Debug,
    {
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        while !done(&got) {
            match self
                .next(end.saturating_duration_since(Instant::now()))
                .await
            {
                Some(m) => got.push(m),
                None => panic!(
                    "condition not met within {wait:?}; got {} messages, the last ones: {:#?}",
                    got.len(),
                    &got[got.len().saturating_sub(10)..]
                ),
            }
        }
        got
    }

    /// Stops receiving, sends the last acknowledgements, and disconnects.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the forwarding task has ended already (the bus closed).
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.forward).await {
            panic!("the sink ended abnormally: {e}");
        }
        self.bus.close(self.bus_task).await;
    }
}
