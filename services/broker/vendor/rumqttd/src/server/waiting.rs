//! wattbus: the connections waiting for their login (TLS handshake and CONNECT), bounded per
//! source and in all.
//!
//! A client that has not logged in yet may hold only a place here. When a new connection
//! arrives and its source already has [`PER_SOURCE`] waiting, that source's oldest waiting
//! connection is closed; when all [`TOTAL`] places are taken, the oldest of all is. The new
//! connection always gets its place: a real client sends its CONNECT within a round trip of
//! connecting, so it is through before a flood of idle sockets can push it out, while the
//! flood only ever pushes out its own (older) sockets. An earlier bound refused the newest
//! connection instead, and 128 idle sockets kept every new login out until they timed out.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::WaitingLimit;

/// Most connections from one source waiting for their login at once.
pub(crate) const PER_SOURCE: usize = 16;

/// Most connections waiting for their login at once, from all sources on all listeners of
/// one broker. With the 64 KiB CONNECT bound this keeps what unauthenticated clients can make
/// the broker hold to about 128 × (64 + 20) KiB.
pub(crate) const TOTAL: usize = 128;

/// Where a connection comes from, as far as the bound is concerned: its IPv4 address, or the
/// /64 network of its IPv6 address (one host usually has a whole /64 to pick addresses from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl Source {
    fn of(addr: &SocketAddr) -> Source {
        match addr.ip() {
            IpAddr::V4(ip) => Source::V4(ip.octets()),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let o = ip.octets();
                    Source::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

struct Entry {
    source: Source,
    addr: SocketAddr,
    /// Dropped to close the connection: its [`Place::closed`] then resolves.
    _close: flume::Sender<()>,
}

#[derive(Default)]
struct Table {
    next: u64,
    /// Oldest first.
    by_age: BTreeMap<u64, Entry>,
    by_source: HashMap<Source, VecDeque<u64>>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.by_age.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&entry.source) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_source.remove(&entry.source);
            }
        }
        Some(entry)
    }
}

/// The waiting connections of one broker, shared by its listeners.
#[derive(Default)]
pub(crate) struct Waiting {
    table: Mutex<Table>,
}

/// A connection's place among the waiting, given back when dropped.
pub(crate) struct Place {
    waiting: Arc<Waiting>,
    id: u64,
    closed: flume::Receiver<()>,
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing done under this lock can leave the table half-changed.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection from `addr`, and the connection it pushed out, if any (with
    /// the limit that made it go): that one's [`Place::closed`] resolves.
    pub(crate) fn enter(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> (Place, Option<(SocketAddr, WaitingLimit)>) {
        let source = Source::of(&addr);
        let (close, closed) = flume::bounded(1);
        let mut table = self.lock();
        let from_source = table.by_source.get(&source).map_or(0, VecDeque::len);
        let oldest = if from_source >= PER_SOURCE {
            let id = table
                .by_source
                .get(&source)
                .and_then(|ids| ids.front().copied());
            id.map(|id| (id, WaitingLimit::PerSource(PER_SOURCE)))
        } else if table.by_age.len() >= TOTAL {
            let id = table.by_age.keys().next().copied();
            id.map(|id| (id, WaitingLimit::Total(TOTAL)))
        } else {
            None
        };
        let pushed_out = oldest.and_then(|(id, limit)| {
            let entry = table.remove(id)?;
            Some((entry.addr, limit))
        });
        let id = table.next;
        table.next += 1;
        table.by_age.insert(
            id,
            Entry {
                source,
                addr,
                _close: close,
            },
        );
        table.by_source.entry(source).or_default().push_back(id);
        drop(table);
        let place = Place {
            waiting: Arc::clone(self),
            id,
            closed,
        };
        (place, pushed_out)
    }
}

impl Place {
    /// Resolves when a newer connection has taken this place.
    pub(crate) async fn closed(&self) {
        // Nothing is ever sent: the sender is dropped when the place is taken.
        let _ = self.closed.recv_async().await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.waiting.lock().remove(self.id);
    }
}
