//! `cargo bench -p rms-processor --bench kernel`: samples per second through the RMS kernel,
//! current only and current + voltage, for a 1 s window at 2 kHz and a 10 s window at 10 kHz.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rms_processor::kernel::{ChannelSettings, WindowSamples, compute};
use std::f64::consts::PI;
use std::hint::black_box;

fn signal(n: usize, fs: f64, amp: f64, dc: f64, phase: f64) -> Vec<f32> {
    (0..n)
        .map(|i| (amp * (2.0 * PI * 50.0 * i as f64 / fs + phase).sin() + dc) as f32)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("rms_kernel");
    for (n, fs) in [(2_000usize, 2_000.0), (100_000, 10_000.0)] {
        let cal = ChannelSettings {
            sample_rate_hz: fs,
            mains_hz: 50.0,
            current_scale: 0.03,
            voltage_scale: 0.5,
            phase_shift: 0.0,
        };
        let i = signal(n, fs, 100.0, 512.0, 0.3);
        let v = signal(n, fs, 600.0, 2048.0, 0.0);
        let mut scratch = Vec::new();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("current/{n}"), |b| {
            b.iter(|| {
                compute(
                    &WindowSamples {
                        current: black_box(&i),
                        voltage: None,
                    },
                    &cal,
                    &mut scratch,
                )
            })
        });
        g.bench_function(format!("current+voltage/{n}"), |b| {
            b.iter(|| {
                compute(
                    &WindowSamples {
                        current: black_box(&i),
                        voltage: Some(black_box(&v)),
                    },
                    &cal,
                    &mut scratch,
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
