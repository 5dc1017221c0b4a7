//! The client-side request limit (`K8S_CLIENT_QPS` / `K8S_CLIENT_BURST`, client-go's token
//! bucket): requests the writer issues wait for a token; watch streams never do.
//!
//! Owns: the bucket arithmetic.
//! Must not: read the clock or sleep. Callers pass `now` (time since any fixed origin) and sleep
//! for the wait the bucket returns, so the arithmetic is tested on explicit times.

use std::time::Duration;

/// Upstream writes IPAM objects through libcalico's Kubernetes client, which runs at QPS 500
/// (SPEC §0, run.go:312; `K8S_CLIENT_QPS` is libcalico's setting). Our writer only writes Calico
/// objects and reads pods to re-validate, so it takes that client's rate; the burst is two
/// seconds' worth, as client-go's own defaults (100/200) are.
pub const DEFAULT_QPS: f32 = 500.0;
pub const DEFAULT_BURST: u32 = 1000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RateError {
    #[error("K8S_CLIENT_QPS must be a finite number, got {0}")]
    Qps(f32),
    #[error("K8S_CLIENT_BURST must be at least 1 when K8S_CLIENT_QPS is positive")]
    Burst,
}

/// A token bucket that lets callers reserve a token ahead: each caller learns at once how long
/// to wait, so concurrent callers queue in order instead of polling.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    /// Tokens at `at`; negative when callers have reserved tokens not yet refilled.
    tokens: f64,
    at: Duration,
}

impl TokenBucket {
    /// `qps <= 0` means no limit (`None`), as a negative QPS does in client-go.
    pub fn new(qps: f32, burst: u32) -> Result<Option<TokenBucket>, RateError> {
        if !qps.is_finite() {
            return Err(RateError::Qps(qps));
        }
        if qps <= 0.0 {
            return Ok(None);
        }
        if burst == 0 {
            return Err(RateError::Burst);
        }
        let burst = f64::from(burst);
        Ok(Some(TokenBucket { per_second: f64::from(qps), burst, tokens: burst, at: Duration::ZERO }))
    }

    /// Takes one token at `now` and returns how long the caller must wait before using it.
    pub fn reserve(&mut self, now: Duration) -> Duration {
        if now > self.at {
            let refill = (now - self.at).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + refill).min(self.burst);
            self.at = now;
        }
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.per_second) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_passes_at_once_and_the_next_request_waits_one_interval() {
        let mut b = TokenBucket::new(10.0, 3).unwrap().unwrap();
        for _ in 0..3 {
            assert_eq!(b.reserve(ms(0)), Duration::ZERO);
        }
        assert_eq!(b.reserve(ms(0)), ms(100));
        assert_eq!(b.reserve(ms(0)), ms(200), "callers queue behind each other");
    }

    #[test]
    fn tokens_refill_at_the_rate_up_to_the_burst() {
        let mut b = TokenBucket::new(10.0, 2).unwrap().unwrap();
        b.reserve(ms(0));
        b.reserve(ms(0));
        assert_eq!(b.reserve(ms(100)), Duration::ZERO, "one token back after 100 ms");
        // A long idle time refills to the burst, not beyond.
        assert_eq!(b.reserve(ms(10_000)), Duration::ZERO);
        assert_eq!(b.reserve(ms(10_000)), Duration::ZERO);
        assert_eq!(b.reserve(ms(10_000)), ms(100));
    }

    #[test]
    fn sustained_requests_go_at_the_configured_rate() {
        let mut b = TokenBucket::new(100.0, 1).unwrap().unwrap();
        let mut now = Duration::ZERO;
        for _ in 0..1000 {
            now += b.reserve(now);
        }
        let secs = now.as_secs_f64();
        assert!((9.9..=10.0).contains(&secs), "1000 requests at 100/s took {secs} s");
    }

    #[test]
    fn zero_or_negative_qps_means_unlimited_and_bad_values_are_refused() {
        assert!(TokenBucket::new(0.0, 0).unwrap().is_none());
        assert!(TokenBucket::new(-1.0, 5).unwrap().is_none());
        assert_eq!(TokenBucket::new(f32::NAN, 5).unwrap_err().to_string(), "K8S_CLIENT_QPS must be a finite number, got NaN");
        assert_eq!(TokenBucket::new(5.0, 0).unwrap_err(), RateError::Burst);
    }
}
