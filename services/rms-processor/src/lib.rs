//! rms-processor: raw sample frames from the bus to RMS current, power and energy.
//!
//! **In progress (issue 3).** What exists so far is the pure core: [`kernel`], whole-cycle RMS
//! with DC removed per window, real and apparent power and power factor with a phase
//! correction, tested against analytic values. The service around it (frames from the bus,
//! windows per channel, energy persisted across restarts, sharing work between two
//! instances) is not written yet, and it is not in `wattbus run`.

pub mod kernel;
