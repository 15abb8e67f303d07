//! Reconnect delays shared by every client of the gateway (device drivers, cloud sinks).

use std::time::Duration;

/// Reconnect delay after `n` consecutive failures: 1 s doubling to 60 s, with ±20 % jitter so a
/// park's worth of gateways does not reconnect in lockstep after a switch reboots.
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << n.saturating_sub(1).min(6));
    let capped = base.min(Duration::from_secs(60));
    capped.mul_f64(0.8 + 0.4 * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        for _ in 0..100 {
            let b1 = backoff(1);
            assert!(b1 >= Duration::from_millis(800) && b1 <= Duration::from_millis(1200));
            let b3 = backoff(3);
            assert!(b3 >= Duration::from_millis(3200) && b3 <= Duration::from_millis(4800));
            let b = backoff(30);
            assert!(b >= Duration::from_secs(48) && b <= Duration::from_secs(72));
        }
    }
}
