//! A batch of readings on its way to the outputs, and the acknowledgement that follows once
//! every output has stored it.

use std::sync::atomic::{AtomicUsize, Ordering};

use proto::Measurement;
use runtime::delivery::{AckToken, Acker};

/// One reading and the topic it came on (dead letters name it).
#[derive(Debug)]
pub struct Item {
    pub topic: String,
    pub measurement: Measurement,
}

/// Readings handed to every enabled output. Acknowledged to their producers when the last
/// output calls [`Batch::done`]; an output that cannot store a batch never calls it, and the
/// producers replay it.
#[derive(Debug)]
pub struct Batch {
    pub items: Vec<Item>,
    remaining: AtomicUsize,
    tokens: Vec<AckToken>,
    acker: Option<Acker>,
}

impl Batch {
    pub fn new(
        items: Vec<Item>,
        tokens: Vec<AckToken>,
        acker: Option<Acker>,
        outputs: usize,
    ) -> Self {
        Self {
            items,
            remaining: AtomicUsize::new(outputs),
            tokens,
            acker,
        }
    }

    /// This output has stored the batch (written, spooled or dead-lettered every point).
    pub fn done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(acker) = &self.acker
        {
            for t in &self.tokens {
                acker.ack(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_only_after_the_last_output() {
        // No acker: the count still runs down without touching anything.
        let b = Batch::new(Vec::new(), Vec::new(), None, 2);
        b.done();
        assert_eq!(b.remaining.load(Ordering::Acquire), 1);
        b.done();
        assert_eq!(b.remaining.load(Ordering::Acquire), 0);
    }
}
