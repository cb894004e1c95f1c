//! A bus of simulated meters: who answers which slave id, and the knobs and counters tests
//! use while a server runs. Transport-free: the TCP and RTU servers turn frames into an
//! [`Op`], ask [`MeterBus::dispatch`] and encode what it says.
//!
//! Invariants:
//! - A slave is found by the address its meter holds *now*, so a write to the WE-515's
//!   0x0110 moves it: it answers that write on the old id and everything after on the new one,
//!   as the real meter does. Two slaves with one address: the first added answers (a real
//!   bus would see a collision; not modelled).
//! - An unpowered slave, an id nobody has, a read to the broadcast id 0 → no answer at all;
//!   the client times out. A broadcast write is applied by every powered slave, unanswered.
//! - The lock is never held across an await: dispatch computes the answer and returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_modbus::ExceptionCode;

use super::{Sdm120, We515};

/// A simulated meter model.
#[derive(Debug, Clone)]
pub enum SimulatedMeter {
    We515(We515),
    Sdm120(Sdm120),
}

impl From<We515> for SimulatedMeter {
    fn from(m: We515) -> Self {
        Self::We515(m)
    }
}

impl From<Sdm120> for SimulatedMeter {
    fn from(m: Sdm120) -> Self {
        Self::Sdm120(m)
    }
}

impl SimulatedMeter {
    pub fn address(&self) -> u8 {
        match self {
            SimulatedMeter::We515(m) => m.address(),
            SimulatedMeter::Sdm120(m) => m.address(),
        }
    }

    fn set_address(&mut self, address: u8) {
        match self {
            SimulatedMeter::We515(m) => m.set_address(address),
            SimulatedMeter::Sdm120(m) => m.set_address(address),
        }
    }

    pub fn as_we515_mut(&mut self) -> Option<&mut We515> {
        match self {
            SimulatedMeter::We515(m) => Some(m),
            SimulatedMeter::Sdm120(_) => None,
        }
    }

    pub fn as_sdm120_mut(&mut self) -> Option<&mut Sdm120> {
        match self {
            SimulatedMeter::Sdm120(m) => Some(m),
            SimulatedMeter::We515(_) => None,
        }
    }

    /// Serve one request at `now_ms`.
    fn call(&mut self, now_ms: i64, op: &Op) -> Result<Reply, ExceptionCode> {
        match (self, op) {
            (SimulatedMeter::We515(m), Op::ReadHolding { addr, count }) => {
                m.values_at(now_ms);
                m.read_holding(*addr, *count).map(Reply::Registers)
            }
            (SimulatedMeter::We515(m), Op::WriteSingle { addr, value }) => m
                .write_single(*addr, *value)
                .map(|()| Reply::WroteSingle(*addr, *value)),
            (SimulatedMeter::We515(m), Op::WriteMultiple { addr, values }) => m
                .write_multiple(*addr, values)
                .map(|()| Reply::WroteMultiple(*addr, values.len() as u16)),
            (SimulatedMeter::Sdm120(m), Op::ReadInput { addr, count }) => {
                m.values_at(now_ms);
                m.read_input(*addr, *count).map(Reply::Registers)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// A request, decoded from either transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    ReadHolding {
        addr: u16,
        count: u16,
    },
    ReadInput {
        addr: u16,
        count: u16,
    },
    WriteSingle {
        addr: u16,
        value: u16,
    },
    WriteMultiple {
        addr: u16,
        values: Vec<u16>,
    },
    /// Any other function code (or a malformed request of a known one): `IllegalFunction`.
    Other(u8),
}

impl Op {
    pub(crate) fn function_code(&self) -> u8 {
        match self {
            Op::ReadHolding { .. } => 0x03,
            Op::ReadInput { .. } => 0x04,
            Op::WriteSingle { .. } => 0x06,
            Op::WriteMultiple { .. } => 0x10,
            Op::Other(fc) => *fc,
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, Op::WriteSingle { .. } | Op::WriteMultiple { .. })
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Registers(Vec<u16>),
    /// FC06 echoes address and value.
    WroteSingle(u16, u16),
    /// FC16 echoes start address and count.
    WroteMultiple(u16, u16),
}

/// What a server does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dispatch {
    /// Say nothing: the client times out.
    Silent,
    /// Answer after `delay` (the meter's processing time).
    Answer {
        reply: Result<Reply, ExceptionCode>,
        delay: Duration,
    },
}

/// Requests one slave has seen while powered (broadcast writes included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Every request addressed to this slave, whatever the outcome.
    pub requests: u64,
    /// Requests by function code (3 = read holding, 4 = read input, 6, 16, …).
    pub by_function: BTreeMap<u8, u64>,
    /// Registers returned by successful reads.
    pub registers_read: u64,
    /// Registers stored by successful writes.
    pub registers_written: u64,
    /// Requests answered with an exception (injected faults included).
    pub exceptions: u64,
}

/// Where the meters take "now" from.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock (`proto::now_ms()`): for the demo.
    #[default]
    System,
    /// A clock the test sets, so what the server answered is known exactly.
    Manual(ManualClock),
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => proto::now_ms(),
            Clock::Manual(c) => c.now_ms(),
        }
    }
}

/// A settable clock (Unix ms), shared by clones.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(now_ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(now_ms)))
    }

    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Slave {
    meter: SimulatedMeter,
    powered: bool,
    /// Injected fault: answer this many more requests with this exception.
    fault: Option<(u32, ExceptionCode)>,
    response_delay: Duration,
    counters: RequestCounts,
}

/// Several simulated meters on one line (RTU) or behind one gateway (TCP). Cheap to clone;
/// clones share the meters, so a test keeps one while a server runs with another.
#[derive(Debug, Clone, Default)]
pub struct MeterBus {
    slaves: Arc<Mutex<Vec<Slave>>>,
    clock: Clock,
}

impl MeterBus {
    /// An empty bus on the system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty bus whose meters read time from `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            slaves: Arc::default(),
            clock,
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Attach `meter` at slave id `id` (1..=247; its address register is set to `id`),
    /// powered, with no fault and no response delay.
    pub fn add(&self, id: u8, meter: impl Into<SimulatedMeter>) -> SlaveHandle {
        let mut meter = meter.into();
        meter.set_address(id);
        let mut slaves = self.lock();
        slaves.push(Slave {
            meter,
            powered: true,
            fault: None,
            response_delay: Duration::ZERO,
            counters: RequestCounts::default(),
        });
        SlaveHandle {
            bus: self.clone(),
            index: slaves.len() - 1,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slave>> {
        // A panic elsewhere cannot leave a meter half-updated in a way that matters to a
        // simulator; keep serving rather than cascade the panic.
        self.slaves.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decide what the bus does with `op` addressed to `unit`.
    pub(crate) fn dispatch(&self, unit: u8, op: &Op) -> Dispatch {
        let now_ms = self.clock.now_ms();
        let mut slaves = self.lock();
        if unit == 0 {
            if op.is_write() {
                for s in slaves.iter_mut().filter(|s| s.powered) {
                    // No answer to carry an exception: a bad broadcast is simply not applied.
                    let reply = s.meter.call(now_ms, op);
                    s.count(op, &reply);
                }
            }
            return Dispatch::Silent;
        }
        let Some(slave) = slaves.iter_mut().find(|s| s.meter.address() == unit) else {
            return Dispatch::Silent;
        };
        if !slave.powered {
            return Dispatch::Silent;
        }
        let reply = match &mut slave.fault {
            Some((n, code)) if *n > 0 => {
                *n -= 1;
                Err(*code)
            }
            _ => slave.meter.call(now_ms, op),
        };
        slave.count(op, &reply);
        Dispatch::Answer {
            reply,
            delay: slave.response_delay,
        }
    }
}

impl Slave {
    fn count(&mut self, op: &Op, reply: &Result<Reply, ExceptionCode>) {
        let c = &mut self.counters;
        c.requests += 1;
        *c.by_function.entry(op.function_code()).or_default() += 1;
        match reply {
            Ok(Reply::Registers(r)) => c.registers_read += r.len() as u64,
            Ok(Reply::WroteSingle(..)) => c.registers_written += 1,
            Ok(Reply::WroteMultiple(_, n)) => c.registers_written += u64::from(*n),
            Err(_) => c.exceptions += 1,
        }
    }
}

/// One slave on a [`MeterBus`]: its knobs and counters, usable while a server runs.
#[derive(Debug, Clone)]
pub struct SlaveHandle {
    bus: MeterBus,
    index: usize,
}

impl SlaveHandle {
    fn with_slave<R>(&self, f: impl FnOnce(&mut Slave) -> R) -> R {
        let mut slaves = self.bus.lock();
        // The index came from `add` and slaves are never removed.
        match slaves.get_mut(self.index) {
            Some(s) => f(s),
            None => unreachable!("slave handle {} outlived its bus entry", self.index),
        }
    }

    /// Switch the meter on or off. Off, it answers nothing (not even broadcasts apply).
    pub fn set_powered(&self, powered: bool) {
        self.with_slave(|s| s.powered = powered);
    }

    pub fn is_powered(&self) -> bool {
        self.with_slave(|s| s.powered)
    }

    /// Answer the next `n` requests to this slave with `code` instead of serving them.
    pub fn fail_next(&self, n: u32, code: ExceptionCode) {
        self.with_slave(|s| s.fault = Some((n, code)));
    }

    /// The meter's processing time before each answer (default 0).
    pub fn set_response_delay(&self, delay: Duration) {
        self.with_slave(|s| s.response_delay = delay);
    }

    /// The slave id it answers to now (changes after a write to the WE-515's 0x0110).
    pub fn address(&self) -> u8 {
        self.with_slave(|s| s.meter.address())
    }

    pub fn counters(&self) -> RequestCounts {
        self.with_slave(|s| s.counters.clone())
    }

    pub fn reset_counters(&self) {
        self.with_slave(|s| s.counters = RequestCounts::default());
    }

    /// Look at or change the model, e.g. for its truth:
    /// `h.with_meter(|m| m.as_we515_mut().map(|w| w.values()))`. Holds the bus lock: keep
    /// `f` short.
    pub fn with_meter<R>(&self, f: impl FnOnce(&mut SimulatedMeter) -> R) -> R {
        self.with_slave(|s| f(&mut s.meter))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const T: i64 = 1_717_200_000_000;

    fn bus() -> (MeterBus, SlaveHandle, SlaveHandle) {
        let bus = MeterBus::with_clock(Clock::Manual(ManualClock::new(T)));
        let a = bus.add(1, We515::new(1, T));
        let b = bus.add(2, We515::new(2, T));
        (bus, a, b)
    }

    fn read(bus: &MeterBus, unit: u8, addr: u16, count: u16) -> Dispatch {
        bus.dispatch(unit, &Op::ReadHolding { addr, count })
    }

    #[test]
    fn each_slave_answers_its_own_id_and_counts_it() {
        let (bus, a, b) = bus();
        let Dispatch::Answer {
            reply: Ok(Reply::Registers(r)),
            ..
        } = read(&bus, 2, 0x0110, 2)
        else {
            panic!("slave 2 answers");
        };
        assert_eq!(r, [2, 4]);
        assert_eq!(read(&bus, 3, 0x0130, 1), Dispatch::Silent);
        assert_eq!(a.counters(), RequestCounts::default());
        let c = b.counters();
        assert_eq!((c.requests, c.registers_read), (1, 2));
        assert_eq!(c.by_function, BTreeMap::from([(3, 1)]));
    }

    #[test]
    fn unpowered_slaves_are_silent_and_faults_answer_exceptions() {
        let (bus, a, _) = bus();
        a.set_powered(false);
        assert_eq!(read(&bus, 1, 0x0130, 1), Dispatch::Silent);
        assert_eq!(a.counters().requests, 0);
        a.set_powered(true);
        a.fail_next(2, ExceptionCode::ServerDeviceBusy);
        for _ in 0..2 {
            assert!(matches!(
                read(&bus, 1, 0x0130, 1),
                Dispatch::Answer {
                    reply: Err(ExceptionCode::ServerDeviceBusy),
                    ..
                }
            ));
        }
        assert!(matches!(
            read(&bus, 1, 0x0130, 1),
            Dispatch::Answer { reply: Ok(_), .. }
        ));
        assert_eq!(a.counters().exceptions, 2);
        // FC04 on a WE-515.
        assert!(matches!(
            bus.dispatch(1, &Op::ReadInput { addr: 0, count: 2 }),
            Dispatch::Answer {
                reply: Err(ExceptionCode::IllegalFunction),
                ..
            }
        ));
    }

    #[test]
    fn an_address_write_moves_the_slave_and_broadcasts_apply_silently() {
        let (bus, a, b) = bus();
        let w = Op::WriteSingle {
            addr: 0x0110,
            value: 7,
        };
        assert!(matches!(
            bus.dispatch(1, &w),
            Dispatch::Answer {
                reply: Ok(Reply::WroteSingle(0x0110, 7)),
                ..
            }
        ));
        assert_eq!(a.address(), 7);
        assert_eq!(read(&bus, 1, 0x0130, 1), Dispatch::Silent);
        assert!(matches!(read(&bus, 7, 0x0130, 1), Dispatch::Answer { .. }));
        // Broadcast baud code 3: both apply it, nobody answers.
        let w = Op::WriteSingle {
            addr: 0x0111,
            value: 3,
        };
        assert_eq!(bus.dispatch(0, &w), Dispatch::Silent);
        for h in [&a, &b] {
            assert_eq!(h.with_meter(|m| m.as_we515_mut().unwrap().baud_code()), 3);
        }
        assert_eq!(read(&bus, 0, 0x0130, 1), Dispatch::Silent);
    }

    #[test]
    fn an_sdm120_answers_input_registers_and_refuses_holding_ones() {
        let bus = MeterBus::with_clock(Clock::Manual(ManualClock::new(T)));
        let h = bus.add(3, Sdm120::new(3, T));
        let Dispatch::Answer {
            reply: Ok(Reply::Registers(r)),
            ..
        } = bus.dispatch(
            3,
            &Op::ReadInput {
                addr: 0x0000,
                count: 2,
            },
        )
        else {
            panic!("the SDM120 answers FC04");
        };
        let v = h.with_meter(|m| m.as_sdm120_mut().unwrap().values());
        let volts = f32::from_bits((u32::from(r[0]) << 16) | u32::from(r[1]));
        assert_eq!(f64::from(volts), v.voltage_v);
        assert!(matches!(
            bus.dispatch(3, &Op::ReadHolding { addr: 0, count: 2 }),
            Dispatch::Answer {
                reply: Err(ExceptionCode::IllegalFunction),
                ..
            }
        ));
    }
}
