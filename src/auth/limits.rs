//! Rate limits that keep one tenant from starving the rest: requests per second per principal
//! and per namespace, and written bytes per second per principal (token buckets, `governor`).
//! They are this node's own (like every rate limiter in front of a replicated store): a client
//! spreading requests over n nodes gets up to n times the rate. Quotas, which must agree
//! across nodes, are replicated and decided in `apply` instead.
//!
//! A refusal is RESOURCE_EXHAUSTED with the wait until the bucket would admit the request.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::ApiError;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// Configured rates; 0 turns a limit off. Bursts are two seconds' worth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateSettings {
    pub requests_per_sec_per_principal: u32,
    pub requests_per_sec_per_namespace: u32,
    pub write_bytes_per_sec_per_principal: u32,
}

pub struct RateLimits {
    clock: DefaultClock,
    principal: Option<Keyed>,
    namespace: Option<Keyed>,
    write_bytes: Option<Keyed>,
}

fn keyed(per_sec: u32, clock: &DefaultClock) -> Option<Keyed> {
    let rate = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(per_sec.saturating_mul(2)).unwrap_or(rate);
    Some(RateLimiter::dashmap_with_clock(Quota::per_second(rate).allow_burst(burst), clock.clone()))
}

impl RateLimits {
    pub fn new(s: RateSettings) -> RateLimits {
        let clock = DefaultClock::default();
        RateLimits {
            principal: keyed(s.requests_per_sec_per_principal, &clock),
            namespace: keyed(s.requests_per_sec_per_namespace, &clock),
            write_bytes: keyed(s.write_bytes_per_sec_per_principal, &clock),
            clock,
        }
    }

    fn check(&self, limiter: &Option<Keyed>, key: &str, n: u32, what: &str) -> Result<(), ApiError> {
        let Some(l) = limiter else { return Ok(()) };
        let n = NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        let refused = |wait_ms: u64, reason: String| {
            metrics::counter!("engram_rate_limited_total", "limit" => what.to_string()).increment(1);
            ApiError::ResourceExhausted { field: String::new(), reason, retry_after_ms: wait_ms.max(1) }
        };
        match l.check_key_n(&key.to_string(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(refused(wait.as_millis() as u64, format!("{what} rate limit; retry in {} ms", wait.as_millis())))
            }
            // More than a whole burst at once: it can never pass.
            Err(_) => Err(refused(1000, format!("a single request exceeds the {what} rate limit's burst"))),
        }
    }

    pub fn check_principal(&self, name: &str) -> Result<(), ApiError> {
        self.check(&self.principal, name, 1, "principal request")
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), ApiError> {
        self.check(&self.namespace, namespace, 1, "namespace request")
    }

    pub fn check_write_bytes(&self, name: &str, bytes: usize) -> Result<(), ApiError> {
        self.check(&self.write_bytes, name, bytes.min(u32::MAX as usize) as u32, "write bytes")
    }

    /// Forgets buckets that have refilled (they behave as new ones), bounding the memory the
    /// limiters hold; the server calls this periodically.
    pub fn sweep(&self) {
        for l in [&self.principal, &self.namespace, &self.write_bytes].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_past_its_burst_is_told_when_to_come_back() {
        let l = RateLimits::new(RateSettings { requests_per_sec_per_principal: 5, ..Default::default() });
        for _ in 0..10 {
            l.check_principal("a").unwrap();
        }
        match l.check_principal("a") {
            Err(ApiError::ResourceExhausted { retry_after_ms, .. }) => assert!((1..=1000).contains(&retry_after_ms)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Another principal has its own bucket; namespaces are unlimited here.
        l.check_principal("b").unwrap();
        l.check_namespace("x").unwrap();
    }

    #[test]
    fn write_bytes_are_counted_by_size() {
        let l = RateLimits::new(RateSettings { write_bytes_per_sec_per_principal: 1000, ..Default::default() });
        l.check_write_bytes("a", 1500).unwrap();
        assert!(l.check_write_bytes("a", 1000).is_err());
        assert!(l.check_write_bytes("b", 5000).is_err(), "over the whole burst");
    }
}
