//! `--max-bandwidth`: a token bucket over the bytes a migration writes to
//! its QUIC streams, as QEMU's max-bandwidth caps a migration's link use.
//!
//! [`TokenBucket`] is the arithmetic, with time passed in; [`Throttle`] is
//! the one every stream of a migration shares, which sleeps.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest burst a throttle allows, whatever the rate: below a few
/// packets' worth the cap would cost more in wake-ups than it saves.
const MIN_BURST: u64 = 64 << 10;
/// A throttle's burst is this much time at its rate.
const BURST_TIME: Duration = Duration::from_millis(100);

/// Tokens are bytes; they accrue at `rate` per second up to `burst`. Taking
/// more than there are is allowed and leaves a debt, which the caller waits
/// off: so one write larger than the burst still passes, at the rate.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    burst: f64,
    /// Bytes that may go now; negative: owed.
    tokens: f64,
    /// When `tokens` was last brought up to date, since the bucket's epoch.
    at: Duration,
}

impl TokenBucket {
    /// A full bucket at time zero. `rate` is at least one byte per second.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: rate.max(1) as f64,
            burst: burst as f64,
            tokens: burst as f64,
            at: Duration::ZERO,
        }
    }

    /// Takes `bytes` at time `now` (since the epoch, never before an earlier
    /// call's) and says how long the caller waits before sending them.
    pub fn take(&mut self, now: Duration, bytes: u64) -> Duration {
        let elapsed = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A [`TokenBucket`] on the clock, shared by all of a migration's streams.
#[derive(Debug)]
pub struct Throttle {
    bucket: Mutex<TokenBucket>,
    epoch: Instant,
    rate: u64,
}

impl Throttle {
    /// A cap of `rate` bytes per second, with a burst of a tenth of a second.
    pub fn new(rate: u64) -> Self {
        let burst = ((rate as f64 * BURST_TIME.as_secs_f64()) as u64).max(MIN_BURST);
        Self {
            bucket: Mutex::new(TokenBucket::new(rate, burst)),
            epoch: Instant::now(),
            rate,
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` may go on the link.
    pub async fn admit(&self, bytes: u64) {
        let wait = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            bucket.take(self.epoch.elapsed(), bytes)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_full_bucket_lets_its_burst_through_at_once() {
        let mut bucket = TokenBucket::new(10 * MIB, MIB);
        assert_eq!(bucket.take(Duration::ZERO, MIB / 2), Duration::ZERO);
        assert_eq!(bucket.take(Duration::ZERO, MIB / 2), Duration::ZERO);
        assert!(bucket.take(Duration::ZERO, 1) > Duration::ZERO);
    }

    #[test]
    fn beyond_the_burst_bytes_wait_at_the_rate() {
        let mut bucket = TokenBucket::new(10 * MIB, MIB);
        assert_eq!(bucket.take(Duration::ZERO, MIB), Duration::ZERO);
        // Ten more MiB at 10 MiB/s: a second's debt.
        let wait = bucket.take(Duration::ZERO, 10 * MIB);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
        // Half a second later half of it is paid.
        let wait = bucket.take(secs(0.5), 0);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn idle_time_refills_no_more_than_the_burst() {
        let mut bucket = TokenBucket::new(MIB, MIB);
        bucket.take(Duration::ZERO, MIB);
        // An hour idle is worth one burst, not 3600 MiB.
        assert_eq!(bucket.take(secs(3600.0), MIB), Duration::ZERO);
        let wait = bucket.take(secs(3600.0), MIB);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn a_long_transfer_takes_its_bytes_over_the_rate() {
        // What a stream of 1 MiB chunks does: wait, then take the next.
        let (rate, burst) = (20 * MIB, 2 * MIB);
        let mut bucket = TokenBucket::new(rate, burst);
        let mut now = Duration::ZERO;
        for _ in 0..100 {
            now += bucket.take(now, MIB);
        }
        let expected = (100 * MIB - burst) as f64 / rate as f64;
        assert!(
            (now.as_secs_f64() - expected).abs() < 1e-6,
            "{now:?} for {expected}"
        );
    }

    #[test]
    fn a_clock_that_goes_back_adds_nothing() {
        let mut bucket = TokenBucket::new(MIB, MIB);
        bucket.take(secs(10.0), 2 * MIB);
        let wait = bucket.take(secs(5.0), 0);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
    }

    #[tokio::test]
    async fn a_throttle_sleeps_off_its_debt() {
        // A burst of a tenth of a second, then another tenth owed.
        let throttle = Throttle::new(10 * MIB);
        let started = std::time::Instant::now();
        throttle.admit(MIB).await;
        throttle.admit(MIB).await;
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert_eq!(throttle.rate(), 10 * MIB);
    }
}
