//! rms-processor: raw sample frames from the bus to RMS current, power and energy.
//!
//! **In progress (issue 3).** What exists so far is the pure core: [`kernel`], whole-cycle RMS
//! with DC removed per window, real and apparent power and power factor with a phase
//! correction, tested against analytic values; and [`energy`], import/export counters per
//! channel that only grow and survive restarts. The service around them (frames from the bus,
//! windows per channel, sharing work between two instances) is not written yet, and it is not
//! in `wattbus run`.

pub mod energy;
pub mod kernel;
