//! The request planner: the registers due now become the fewest Modbus read requests.
//!
//! On a 9600-baud bus every request costs a fixed overhead — an 8-byte request, a 5-byte
//! response header and CRC, two 3.5-character silences, and the meter's own turnaround (often
//! 10–50 ms) — while an extra register in a response costs only 2 bytes. So reading a few
//! unused registers between two wanted ranges (a *hole*) is cheaper than a second request, up
//! to a point: `max_hole` says how many. `max_registers` caps one request (125 for function
//! codes 03/04 in the Modbus Application Protocol v1.1b3, §6.3 and §6.4; some meters accept
//! fewer).
//!
//! The greedy plan is optimal. Registers of one table never overlap (the profile guarantees
//! it), so sorted by address they form a sequence, and a request covers a contiguous run of
//! it. A run can be read in one request iff its span fits `max_registers` and no gap exceeds
//! `max_hole`; both hold for every sub-run of a valid run. Growing each request as far as it
//! goes therefore never needs more requests than any other split (the usual exchange
//! argument: the greedy request ends at or after the first request of any other plan).
//!
//! A hole is read and discarded. Some meters answer a read that touches an unmapped address
//! with exception 02 (illegal data address); their profile sets `max_hole = 0`.

use serde::Deserialize;

use crate::profile::{Function, Register};

/// Most registers one FC03/FC04 read may return (Modbus Application Protocol v1.1b3, §6.3).
pub const MAX_READ_REGISTERS: u16 = 125;

/// Default hole. Line time alone breaks even at about 10 registers (a request's fixed cost is
/// 8 + 5 bytes plus 7 characters of silence = 20 characters, a register 2 characters); the
/// meter's turnaround of 10–50 ms at 9600 baud is worth another 5–20 registers. 32 merges the
/// WE-515's energy block (a 20-register hole between T4 and the reactive total) and keeps
/// clearly separate blocks apart.
pub const DEFAULT_MAX_HOLE: u16 = 32;

/// How far the planner may merge reads for one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most unwanted registers read (and discarded) to join two ranges into one request.
    #[serde(default = "default_max_hole")]
    pub max_hole: u16,
    /// Most registers in one request, 1..=125.
    #[serde(default = "default_max_registers")]
    pub max_registers: u16,
}

const fn default_max_hole() -> u16 {
    DEFAULT_MAX_HOLE
}

const fn default_max_registers() -> u16 {
    MAX_READ_REGISTERS
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_hole: DEFAULT_MAX_HOLE,
            max_registers: MAX_READ_REGISTERS,
        }
    }
}

/// One read request and the registers its response carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub function: Function,
    /// First address read.
    pub start: u16,
    /// Registers read, including holes.
    pub count: u16,
    /// Indices into the register slice given to [`plan`], in address order.
    pub registers: Vec<usize>,
}

impl Request {
    /// Last address read (inclusive).
    pub fn last(&self) -> u16 {
        self.start.saturating_add(self.count.saturating_sub(1))
    }

    /// The words of `register` inside a response to this request, or `None` if the register is
    /// not inside the request or the response is too short.
    pub fn words_of<'a>(&self, register: &Register, response: &'a [u16]) -> Option<&'a [u16]> {
        if register.function != self.function || register.address < self.start {
            return None;
        }
        let from = usize::from(register.address - self.start);
        let to = from + usize::from(register.words());
        if to > usize::from(self.count) {
            return None;
        }
        response.get(from..to)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("max_registers is {0}; a Modbus read carries 1 to {MAX_READ_REGISTERS} registers")]
    MaxRegisters(u16),
    #[error(
        "register {index} at {address:#06x} spans {words} registers, more than max_registers \
         ({max}) allows in one request"
    )]
    TooWide {
        index: usize,
        address: u16,
        words: u16,
        max: u16,
    },
}

/// Plans the reads for the registers of `registers` for which `due` is true: the fewest
/// requests, holding registers first, then input registers, each in address order.
///
/// `registers` must not overlap within a table (a validated profile's never do); the plan of
/// overlapping registers is still valid but not necessarily the fewest requests.
pub fn plan(
    registers: &[Register],
    due: impl Fn(&Register) -> bool,
    limits: Limits,
) -> Result<Vec<Request>, PlanError> {
    if !(1..=MAX_READ_REGISTERS).contains(&limits.max_registers) {
        return Err(PlanError::MaxRegisters(limits.max_registers));
    }
    let mut wanted: Vec<(usize, &Register)> = Vec::new();
    for (index, r) in registers.iter().enumerate() {
        if !due(r) {
            continue;
        }
        if r.words() > limits.max_registers {
            return Err(PlanError::TooWide {
                index,
                address: r.address,
                words: r.words(),
                max: limits.max_registers,
            });
        }
        wanted.push((index, r));
    }
    wanted.sort_by_key(|(_, r)| (r.function, r.address));

    let mut requests: Vec<Request> = Vec::new();
    for (index, r) in wanted {
        // Computed in u32: a register ending at 0xFFFF must not wrap.
        let first = u32::from(r.address);
        let last = first + u32::from(r.words()) - 1;
        if let Some(current) = requests.last_mut()
            && current.function == r.function
        {
            let start = u32::from(current.start);
            let end = start + u32::from(current.count); // one past the last address read
            let hole = first.saturating_sub(end);
            let span = last.max(end - 1) - start + 1;
            if hole <= u32::from(limits.max_hole) && span <= u32::from(limits.max_registers) {
                // span ≤ max_registers ≤ 125, so it fits a u16.
                current.count = span as u16;
                current.registers.push(index);
                continue;
            }
        }
        requests.push(Request {
            function: r.function,
            start: r.address,
            count: r.words(),
            registers: vec![index],
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Profiles, ValueType, WordOrder};
    use proto::Segment;

    fn reg(function: Function, address: u16, value_type: ValueType, poll: &str) -> Register {
        Register {
            address,
            function,
            value_type,
            word_order: WordOrder::Big,
            scale: 1.0,
            unit: String::new(),
            measurement: Segment::new("m").unwrap(),
            channel: Segment::new("c").unwrap(),
            field: format!("f{address}"),
            tags: Default::default(),
            poll: poll.to_string(),
        }
    }

    fn ranges(requests: &[Request]) -> Vec<(Function, u16, u16)> {
        requests
            .iter()
            .map(|r| (r.function, r.start, r.last()))
            .collect()
    }

    #[test]
    fn we515_with_all_classes_due_is_two_requests() {
        let set = Profiles::builtin().unwrap();
        let p = set.get("orno-we-515").unwrap();
        let requests = plan(&p.registers, |_| true, p.limits).unwrap();
        assert_eq!(
            ranges(&requests),
            vec![
                (Function::Holding, 0x0130, 0x015B),
                (Function::Holding, 0xA000, 0xA027),
            ]
        );
        assert_eq!(requests[0].count, 44);
        assert_eq!(requests[1].count, 40);
        // Every register is in exactly one request.
        let mut all: Vec<usize> = requests.iter().flat_map(|r| r.registers.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..p.registers.len()).collect::<Vec<_>>());
    }

    #[test]
    fn we515_with_only_the_fast_class_due_reads_only_the_first_block() {
        let set = Profiles::builtin().unwrap();
        let p = set.get("orno-we-515").unwrap();
        let requests = plan(&p.registers, |r| r.poll == "fast", p.limits).unwrap();
        assert_eq!(ranges(&requests), vec![(Function::Holding, 0x0130, 0x015B)]);
        let slow = plan(&p.registers, |r| r.poll == "slow", p.limits).unwrap();
        assert_eq!(ranges(&slow), vec![(Function::Holding, 0xA000, 0xA027)]);
    }

    #[test]
    fn without_holes_only_adjacent_registers_merge() {
        let set = Profiles::builtin().unwrap();
        let p = set.get("orno-we-515").unwrap();
        let limits = Limits {
            max_hole: 0,
            ..p.limits
        };
        let requests = plan(&p.registers, |r| r.poll == "slow", limits).unwrap();
        // T1–T4 follow the total without a gap, and so do the reactive counters.
        assert_eq!(
            ranges(&requests),
            vec![
                (Function::Holding, 0xA000, 0xA009),
                (Function::Holding, 0xA01E, 0xA027),
            ]
        );
    }

    #[test]
    fn hole_size_is_a_limit_inclusive() {
        let regs = [
            reg(Function::Holding, 10, ValueType::U16, "a"),
            reg(Function::Holding, 15, ValueType::U16, "a"), // hole of 4: 11..=14
        ];
        let at = |max_hole| {
            plan(
                &regs,
                |_| true,
                Limits {
                    max_hole,
                    max_registers: 125,
                },
            )
            .unwrap()
            .len()
        };
        assert_eq!(at(4), 1);
        assert_eq!(at(3), 2);
    }

    #[test]
    fn max_registers_splits_a_long_run() {
        // 100 consecutive f32 values = 200 registers: 125 is not a multiple of 2, so the first
        // request stops at 124 registers rather than cutting a value in half.
        let regs: Vec<Register> = (0..100)
            .map(|i| reg(Function::Input, i * 2, ValueType::F32, "a"))
            .collect();
        let requests = plan(&regs, |_| true, Limits::default()).unwrap();
        assert_eq!(
            ranges(&requests),
            vec![(Function::Input, 0, 123), (Function::Input, 124, 199)]
        );
    }

    #[test]
    fn tables_are_never_merged() {
        let regs = [
            reg(Function::Input, 0, ValueType::F32, "a"),
            reg(Function::Holding, 2, ValueType::F32, "a"),
        ];
        let requests = plan(&regs, |_| true, Limits::default()).unwrap();
        assert_eq!(
            ranges(&requests),
            vec![(Function::Holding, 2, 3), (Function::Input, 0, 1)]
        );
        assert_eq!(requests[0].registers, vec![1]);
    }

    #[test]
    fn a_register_at_the_top_of_the_table_does_not_wrap() {
        let regs = [
            reg(Function::Holding, 0xFFF0, ValueType::U16, "a"),
            reg(Function::Holding, 0xFFFE, ValueType::U32, "a"),
        ];
        let requests = plan(&regs, |_| true, Limits::default()).unwrap();
        assert_eq!(ranges(&requests), vec![(Function::Holding, 0xFFF0, 0xFFFF)]);
        assert_eq!(requests[0].count, 16);
    }

    #[test]
    fn bad_limits_are_errors() {
        let regs = [reg(Function::Holding, 0, ValueType::U64, "a")];
        let zero = Limits {
            max_hole: 0,
            max_registers: 0,
        };
        assert_eq!(plan(&regs, |_| true, zero), Err(PlanError::MaxRegisters(0)));
        let narrow = Limits {
            max_hole: 0,
            max_registers: 2,
        };
        assert!(matches!(
            plan(&regs, |_| true, narrow),
            Err(PlanError::TooWide { words: 4, .. })
        ));
    }

    #[test]
    fn words_of_finds_a_register_inside_the_response() {
        let regs = [
            reg(Function::Holding, 0x10, ValueType::U16, "a"),
            reg(Function::Holding, 0x14, ValueType::U32, "a"),
        ];
        let requests = plan(&regs, |_| true, Limits::default()).unwrap();
        let response = [1, 2, 3, 4, 5, 6];
        assert_eq!(requests[0].words_of(&regs[1], &response), Some(&[5, 6][..]));
        assert_eq!(requests[0].words_of(&regs[0], &response), Some(&[1][..]));
        assert_eq!(requests[0].words_of(&regs[1], &response[..5]), None);
        let elsewhere = reg(Function::Holding, 0x30, ValueType::U16, "a");
        assert_eq!(requests[0].words_of(&elsewhere, &response), None);
    }
}
