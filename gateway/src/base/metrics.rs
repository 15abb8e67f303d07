//! Metric primitives: plain atomics, so a counter update on the hot path is one relaxed add.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A value that goes up and down (queue lengths, connection state).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency distribution in seconds: prometheus-client's histogram (fixed buckets, one short
/// lock per observation), for device requests.
#[derive(Debug)]
pub struct RequestLatency(pub prometheus_client::metrics::histogram::Histogram);

impl Default for RequestLatency {
    /// 1 ms to 5 s: a Modbus TCP answer on a LAN takes milliseconds, a serial line tens of them, a
    /// timeout seconds.
    fn default() -> Self {
        RequestLatency(prometheus_client::metrics::histogram::Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]))
    }
}

impl RequestLatency {
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// The time plugin calls take, in seconds.
#[derive(Debug)]
pub struct CallLatency(pub prometheus_client::metrics::histogram::Histogram);

impl Default for CallLatency {
    /// 50 µs to 1 s: a small plugin call takes tens of microseconds; the default call timeout is
    /// a second.
    fn default() -> Self {
        CallLatency(prometheus_client::metrics::histogram::Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]))
    }
}

impl CallLatency {
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}
