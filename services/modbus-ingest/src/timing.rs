//! How long Modbus RTU reads occupy a serial line, from frame sizes alone.
//!
//! Sources: Modbus over Serial Line v1.02 (§2.5.1 RTU framing, §2.5.1.1 the 3.5-character
//! silence and its fixed 1.75 ms above 19200 baud; §2.5.1 the 11-bit character: start, 8 data,
//! parity, stop — or a second stop bit when there is no parity) and the Modbus Application
//! Protocol v1.1b3 (§6.3/6.4 the FC03/FC04 PDUs).
//!
//! A read of N registers (FC03 or FC04) on the wire:
//! - request: address 1 + function 1 + start 2 + count 2 + CRC 2 = 8 bytes;
//! - response: address 1 + function 1 + byte count 1 + 2N data + CRC 2 = 5 + 2N bytes;
//! - each frame is followed by at least 3.5 character times of silence.
//!
//! So one read takes `(8 + 5 + 2N) · c + 2 · t3.5`, where `c = bits per character / baud`.
//! The meter's turnaround (the time it takes to start answering, 10–50 ms on typical meters)
//! is not line time and is not counted: these figures are a floor that the benchmark compares
//! with measured cycle times.

use std::time::Duration;

use serde::Deserialize;

/// Bytes of an FC03/FC04 read request.
pub const READ_REQUEST_BYTES: u32 = 8;

/// Above this baud rate the inter-frame silence no longer scales with the character time.
const FIXED_SILENCE_ABOVE_BAUD: u32 = 19_200;
/// The fixed inter-frame silence used above 19200 baud.
const FIXED_SILENCE_S: f64 = 1.75e-3;

/// Bytes of the response to a read of `registers` registers.
pub const fn read_response_bytes(registers: u16) -> u32 {
    5 + 2 * registers as u32
}

/// Serial character framing. Modbus RTU prescribes 11-bit characters (8E1, 8O1, or 8N2 without
/// parity); 8N1 (10 bits) is not in the spec but several meters ship with it — the ORNO WE-515
/// vendor PDF says 8N1 while mbmd's README says 8E1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Framing {
    #[serde(rename = "8N1")]
    N1,
    #[serde(rename = "8E1")]
    E1,
    #[serde(rename = "8O1")]
    O1,
    #[serde(rename = "8N2")]
    N2,
}

impl Framing {
    /// Start bit + 8 data bits + parity and stop bits.
    pub const fn bits_per_char(self) -> u32 {
        match self {
            Framing::N1 => 10,
            Framing::E1 | Framing::O1 | Framing::N2 => 11,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("baud rate must be positive")]
    ZeroBaud,
    #[error("the period must be longer than zero")]
    ZeroPeriod,
}

/// A serial line's speed and framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    baud: u32,
    framing: Framing,
}

impl Line {
    pub fn new(baud: u32, framing: Framing) -> Result<Line, TimingError> {
        if baud == 0 {
            return Err(TimingError::ZeroBaud);
        }
        Ok(Line { baud, framing })
    }

    /// Seconds one character occupies the line.
    pub fn char_s(&self) -> f64 {
        f64::from(self.framing.bits_per_char()) / f64::from(self.baud)
    }

    /// The silence after each frame (t3.5).
    pub fn silence_s(&self) -> f64 {
        if self.baud > FIXED_SILENCE_ABOVE_BAUD {
            FIXED_SILENCE_S
        } else {
            3.5 * self.char_s()
        }
    }

    /// Seconds of line time for one read of `registers` registers: request, response and the
    /// silence after each.
    pub fn read_s(&self, registers: u16) -> f64 {
        let bytes = READ_REQUEST_BYTES + read_response_bytes(registers);
        f64::from(bytes) * self.char_s() + 2.0 * self.silence_s()
    }
}

/// One read that happens `times` times per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRate {
    pub registers: u16,
    pub times: u32,
}

/// The fraction of `period` the line is busy with `polls` (1.0 = saturated; above 1.0 the
/// schedule cannot be kept). For per-class rates pick a common period: with power every 1 s
/// and energy every 60 s, a 60 s period holds 60 power reads and 1 energy read.
pub fn utilisation(
    polls: &[ReadRate],
    baud: u32,
    framing: Framing,
    period: Duration,
) -> Result<f64, TimingError> {
    let line = Line::new(baud, framing)?;
    if period.is_zero() {
        return Err(TimingError::ZeroPeriod);
    }
    let busy: f64 = polls
        .iter()
        .map(|p| f64::from(p.times) * line.read_s(p.registers))
        .sum();
    Ok(busy / period.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn frame_sizes() {
        assert_eq!(READ_REQUEST_BYTES, 8);
        assert_eq!(read_response_bytes(1), 7);
        assert_eq!(read_response_bytes(44), 93);
        assert_eq!(read_response_bytes(125), 255);
    }

    #[test]
    fn character_and_silence_at_9600() {
        let e1 = Line::new(9600, Framing::E1).unwrap();
        // 11 / 9600 s = 1.1458 ms; t3.5 = 4.0104 ms.
        close(e1.char_s(), 0.001_145_833_333_333_333_4);
        close(e1.silence_s(), 0.004_010_416_666_666_667);
        close(
            Line::new(9600, Framing::N2).unwrap().char_s(),
            11.0 / 9600.0,
        );
        let n1 = Line::new(9600, Framing::N1).unwrap();
        close(n1.char_s(), 0.001_041_666_666_666_666_7);
    }

    #[test]
    fn silence_is_fixed_above_19200() {
        close(
            Line::new(19_200, Framing::E1).unwrap().silence_s(),
            3.5 * 11.0 / 19_200.0,
        );
        close(Line::new(38_400, Framing::E1).unwrap().silence_s(), 0.00175);
        close(
            Line::new(115_200, Framing::N1).unwrap().silence_s(),
            0.00175,
        );
    }

    #[test]
    fn we515_two_reads_each_second_at_9600_8e1() {
        // 44 registers: 8 + 93 = 101 characters + 7 of silence = 108 × 11 / 9600 = 123.75 ms.
        // 40 registers: 8 + 85 = 93 characters + 7 = 100 × 11 / 9600 = 114.583 ms.
        let line = Line::new(9600, Framing::E1).unwrap();
        close(line.read_s(44), 0.12375);
        close(line.read_s(40), 1100.0 / 9600.0);
        let polls = [
            ReadRate {
                registers: 44,
                times: 1,
            },
            ReadRate {
                registers: 40,
                times: 1,
            },
        ];
        let u = utilisation(&polls, 9600, Framing::E1, Duration::from_secs(1)).unwrap();
        close(u, 2288.0 / 9600.0); // 23.8 %
    }

    #[test]
    fn per_class_rates_over_a_common_period() {
        // Power block every second, energy block every minute, 8N1: 60 × 108 + 1 × 100
        // characters (silence included) of 10 bits at 9600 baud, over 60 s = 11.4 %.
        let polls = [
            ReadRate {
                registers: 44,
                times: 60,
            },
            ReadRate {
                registers: 40,
                times: 1,
            },
        ];
        let u = utilisation(&polls, 9600, Framing::N1, Duration::from_secs(60)).unwrap();
        let chars = 60.0 * (101.0 + 7.0) + (93.0 + 7.0);
        close(u, chars * 10.0 / 9600.0 / 60.0);
        close(u, 6580.0 / 57_600.0);
    }

    #[test]
    fn one_read_per_value_costs_as_much_line_time_as_reading_everything_merged() {
        // mbmd's ORNO1p producer (meters/rs485/orno1p.go) reads nine values of 1 or 2 registers
        // each, one request per value; the planner reads the whole map in two.
        let mbmd: Vec<ReadRate> = [1, 1, 2, 2, 2, 2, 1, 2, 2]
            .into_iter()
            .map(|registers| ReadRate {
                registers,
                times: 1,
            })
            .collect();
        let ours = [
            ReadRate {
                registers: 44,
                times: 1,
            },
            ReadRate {
                registers: 40,
                times: 1,
            },
        ];
        let p = Duration::from_secs(1);
        let a = utilisation(&mbmd, 9600, Framing::E1, p).unwrap();
        let b = utilisation(&ours, 9600, Framing::E1, p).unwrap();
        // Each read: 8 + 5 bytes + 7 characters of silence = 20 characters plus 2 per register.
        // 9 × 20 + 2 × 15 = 210 characters against 2 × 20 + 2 × 84 = 208: all 84 registers for
        // slightly less line time than 15, and two meter turnarounds instead of nine.
        close(a, 210.0 * 11.0 / 9600.0);
        close(b, 208.0 * 11.0 / 9600.0);
    }

    #[test]
    fn zero_baud_or_period_is_an_error() {
        let p = [ReadRate {
            registers: 1,
            times: 1,
        }];
        assert_eq!(
            utilisation(&p, 0, Framing::E1, Duration::from_secs(1)),
            Err(TimingError::ZeroBaud)
        );
        assert_eq!(
            utilisation(&p, 9600, Framing::E1, Duration::ZERO),
            Err(TimingError::ZeroPeriod)
        );
    }
}
