use super::Ack;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    // wattbus: what the entry costs, itself included (this was 4 + topic + payload: an entry
    // of a few hundred bytes was counted as a few, so a log of small messages held many times
    // `max_segment_size` per segment), and its properties too.
    fn size(&self) -> usize {
        let publish = &self.publish;
        let properties = self.properties.as_ref().map_or(0, properties_size);
        std::mem::size_of::<Self>() + publish.topic.len() + publish.payload.len() + properties
    }
}

/// wattbus: the heap the properties of a message hold.
fn properties_size(p: &PublishProperties) -> usize {
    let string = std::mem::size_of::<String>();
    p.response_topic.as_ref().map_or(0, String::len)
        + p.correlation_data.as_ref().map_or(0, |d| d.len())
        + p.content_type.as_ref().map_or(0, String::len)
        + p.user_properties
            .iter()
            .map(|(k, v)| 2 * string + k.len() + v.len())
            .sum::<usize>()
        + p.subscription_identifiers.len() * std::mem::size_of::<usize>()
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: FilterLogs<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// wattbus: what `retained_publishes` holds, in bytes (topics included)
    retained_bytes: usize,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// wattbus: what `publish_filters` holds, in bytes, roughly
    publish_filters_bytes: usize,
}

/// wattbus: `publish_filters` is a cache of which logs a topic goes to, and had an entry for
/// every distinct topic ever published (topics up to 64 KiB each) for good. Past this many
/// bytes it is emptied and fills again from the topics in use.
const PUBLISH_FILTERS_MAX_BYTES: usize = 1 << 20;

/// wattbus: what one `publish_filters` entry costs besides its topic and indexes.
const PUBLISH_FILTERS_ENTRY_BYTES: usize = 64;

fn publish_filters_cost(topic: &str, filters: &[FilterIdx]) -> usize {
    PUBLISH_FILTERS_ENTRY_BYTES + topic.len() + std::mem::size_of_val(filters)
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = FilterLogs::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            publish_filters_bytes: 0,
            filter_indexes,
            retained_publishes,
            retained_bytes: 0,
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    /// wattbus: `log_filter` names the log (`f` for `$share/<group>/<f>`), `filter` the
    /// subscription: it was looked up by `filter` alone, which finds no log for a shared
    /// subscription (its waiter stayed parked, and the client got messages after it
    /// unsubscribed), and took the first waiter of the connection in the log, which may be
    /// another subscription of it to the same log.
    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        log_filter: &str,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(log_filter)?)?;
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|(conn_id, request)| *conn_id == id && request.filter == *filter)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                let v: Vec<usize> = self
                    .filter_indexes
                    .iter()
                    .filter(|(filter, _)| matches(topic, filter))
                    .map(|(_, filter_idx)| *filter_idx)
                    .collect();

                if !v.is_empty() {
                    let cost = publish_filters_cost(topic, &v);
                    if self.publish_filters_bytes + cost > PUBLISH_FILTERS_MAX_BYTES {
                        self.publish_filters.clear();
                        self.publish_filters_bytes = 0;
                    }
                    self.publish_filters_bytes += cost;
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);

                // Match new filter to existing topics and add to publish_filters if it matches
                for (topic, filters) in publish_filters.iter_mut() {
                    if matches(topic, filter) {
                        filters.push(idx);
                        self.publish_filters_bytes += std::mem::size_of::<FilterIdx>();
                    }
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // wattbus: logs are freed now (`remove_log`), so a missing one is an error, not a panic
        let data = self.native.get(filter_idx).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no log {filter_idx}"))
        })?;
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        // wattbus: a request whose log was freed has nothing to wait for
        if let Some(data) = self.native.get_mut(request.filter_idx) {
            data.waiters.register(id, request);
        }
    }

    /// wattbus: whether `filter` has a log
    pub fn has_log(&self, filter: &str) -> bool {
        self.filter_indexes.contains_key(filter)
    }

    /// wattbus: how many filter logs there are
    pub fn log_count(&self) -> usize {
        self.filter_indexes.len()
    }

    /// wattbus: free the log of `filter`, which nobody subscribes any more (rumqtt #1001:
    /// a log was kept for the life of the process, so every distinct filter ever subscribed
    /// cost memory for good).
    pub fn remove_log(&mut self, filter: &str) {
        let Some(idx) = self.filter_indexes.remove(filter) else {
            return;
        };
        self.native.remove(idx);
        self.publish_filters.retain(|_, idxs| {
            idxs.retain(|i| *i != idx);
            !idxs.is_empty()
        });
        self.publish_filters_bytes = self
            .publish_filters
            .iter()
            .map(|(topic, idxs)| publish_filters_cost(topic, idxs))
            .sum();
    }

    /// wattbus: while the logs hold more than `max_log_bytes` together, drop the oldest
    /// segment of the largest. `max_segment_size` × `max_segment_count` bounds one log; this
    /// bounds them all, whatever the number of filters and however large their messages.
    /// wattbus: the parked readers of every log.
    pub fn all_waiters(&self) -> impl Iterator<Item = (FilterIdx, &Waiters<DataRequest>)> {
        self.native.logs.iter().map(|(idx, data)| (*idx, &data.waiters))
    }

    /// wattbus: whether all logs together hold more than `max_log_bytes`.
    pub fn over_log_budget(&self) -> bool {
        let Some(max) = self.config.max_log_bytes else {
            return false;
        };
        let total: u64 = self.native.logs.values().map(|data| data.log.size()).sum();
        total > max as u64
    }

    /// wattbus: bring all logs together back within `max_log_bytes` by dropping the oldest
    /// segment of a log, chosen by `weight`: per filter, the fewest filters any of its readers
    /// holds (a log nobody reads is not in it, and goes first). The log with the greatest
    /// weight goes first, the largest among equals. Dropping the largest log first dropped
    /// messages the services had not read yet when one login filled the budget with copies of
    /// every message in 256 filters (hostile reviews: raw frames dropped twice, windows never
    /// computed); now the copies of a client holding many filters go first, and a log that
    /// such a client shares with a service counts as the service's.
    pub fn enforce_log_budget(&mut self, weight: &HashMap<FilterIdx, usize>) {
        let Some(max) = self.config.max_log_bytes else {
            return;
        };
        let mut total: u64 = self.native.logs.values().map(|data| data.log.size()).sum();
        while total > max as u64 {
            let victim = self
                .native
                .logs
                .iter_mut()
                .filter(|(_, data)| data.log.size() > 0)
                .max_by_key(|(idx, data)| {
                    let w = weight.get(*idx).copied().unwrap_or(usize::MAX);
                    (w, data.log.size())
                });
            let freed = victim.map_or(0, |(_, data)| data.log.drop_oldest());
            if freed == 0 {
                break;
            }
            total -= freed;
        }
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    /// wattbus: returns whether the message is kept. Not if it would take the retained
    /// messages past `max_retained_bytes`: then the topic keeps no retained message at all
    /// (its previous one is dropped too, rather than served stale).
    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) -> bool {
        self.remove_from_retained_publishes(topic.clone());
        let data: PublishData = (publish, publish_properties).into();
        let cost = topic.len() + data.size();
        if let Some(max) = self.config.max_retained_bytes {
            if self.retained_bytes + cost > max {
                return false;
            }
        }
        self.retained_bytes += cost;
        self.retained_publishes.insert(topic, data);
        true
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        if let Some(old) = self.retained_publishes.remove(&topic) {
            self.retained_bytes -= topic.len() + old.size();
        }
    }

    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        let retained_bytes = &mut self.retained_bytes;
        self.retained_publishes.retain(|topic, pubdata| {
            let cost = topic.len() + pubdata.size();
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            } else {
                *retained_bytes -= cost;
            }

            is_valid
        });

        // no need to include timestamp when returning
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(_, p)| (p.publish.clone(), p.properties.clone()))
            .collect()
    }
}

/// wattbus: the filter logs by index. Unlike the `Slab` they were in, an index is never
/// reused once its log is freed: a stale index left somewhere (an unacknowledged message's
/// `(pkid, filter_idx, cursor)`) finds no log rather than another filter's.
pub struct FilterLogs<T> {
    logs: HashMap<FilterIdx, T>,
    next: FilterIdx,
}

impl<T> FilterLogs<T> {
    pub fn new() -> Self {
        FilterLogs {
            logs: HashMap::new(),
            next: 0,
        }
    }

    pub fn insert(&mut self, log: T) -> FilterIdx {
        let idx = self.next;
        self.next += 1;
        self.logs.insert(idx, log);
        idx
    }

    pub fn get(&self, idx: FilterIdx) -> Option<&T> {
        self.logs.get(&idx)
    }

    pub fn get_mut(&mut self, idx: FilterIdx) -> Option<&mut T> {
        self.logs.get_mut(&idx)
    }

    pub fn remove(&mut self, idx: FilterIdx) -> Option<T> {
        self.logs.remove(&idx)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&FilterIdx, &mut T)> {
        self.logs.iter_mut()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        let waiters = Waiters::with_capacity(10);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            committed: VecDeque::with_capacity(100),
            recorded: VecDeque::with_capacity(100),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            ..Default::default()
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            ..Default::default()
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
