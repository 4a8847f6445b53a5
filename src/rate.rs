//! The per-session rate limit (PROTOCOL.md 3.3 `rate_limited`): a token bucket.

use std::time::Instant;

/// Refusals in a row after which a session that keeps flooding is closed (1008).
pub const MAX_STRIKES: u32 = 100;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    /// Rate-limited messages since the last one let through.
    pub strikes: u32,
}

/// What the bucket says of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Refuse it with `rate_limited`.
    Refuse,
    /// Refused too many times in a row: close with 1008.
    Abuse,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        TokenBucket { tokens: f64::from(burst), last: now, strikes: 0 }
    }

    /// Takes one token for a message arriving at `now`.
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            Verdict::Pass
        } else {
            self.strikes += 1;
            if self.strikes > MAX_STRIKES {
                Verdict::Abuse
            } else {
                Verdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(10.0, 3, start), Verdict::Pass);
        }
        assert_eq!(bucket.take(10.0, 3, start), Verdict::Refuse);
        // 10 a second: one more after 100 ms.
        assert_eq!(bucket.take(10.0, 3, start + Duration::from_millis(100)), Verdict::Pass);
        assert_eq!(bucket.take(10.0, 3, start + Duration::from_millis(100)), Verdict::Refuse);
        // The bucket never holds more than the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take(10.0, 3, later), Verdict::Pass);
        }
        assert_eq!(bucket.take(10.0, 3, later), Verdict::Refuse);
    }

    #[test]
    fn sustained_abuse_is_named() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(1, now);
        assert_eq!(bucket.take(1.0, 1, now), Verdict::Pass);
        for _ in 0..MAX_STRIKES {
            assert_eq!(bucket.take(1.0, 1, now), Verdict::Refuse);
        }
        assert_eq!(bucket.take(1.0, 1, now), Verdict::Abuse);
    }
}
