//! Bandwidth limits: a shared byte budget per second (WAN fetches, LAN serving).
//!
//! Owns the wrapper around `governor` that meters bytes rather than requests: one limiter is
//! shared by every transfer it governs, so `serve.max_bytes_per_sec` is a budget for all
//! clients together. It must never buffer or touch the bytes themselves: callers ask for
//! permission to move `n` bytes and then move them.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A byte-rate limiter; 0 bytes per second means unlimited. Its rate can change while it is
/// in use ([`ByteLimiter::set_rate`], a config reload): transfers under way move to the new
/// budget at their next grant.
pub struct ByteLimiter {
    current: std::sync::RwLock<std::sync::Arc<Budget>>,
}

/// One rate's limiter.
struct Budget {
    limiter: Option<DefaultDirectRateLimiter>,
    /// Largest single grant: a tenth of a second's worth (at least 4 KiB), so transfers stay
    /// smooth and concurrent ones interleave.
    burst: u32,
    bytes_per_sec: u64,
}

impl Budget {
    fn new(bytes_per_sec: u64) -> Budget {
        let rate = bytes_per_sec.min(u32::MAX as u64) as u32;
        let Some(rate_nz) = NonZeroU32::new(rate) else {
            return Budget {
                limiter: None,
                burst: 0,
                bytes_per_sec: 0,
            };
        };
        let burst = (rate / 10).max(4096).min(rate);
        let burst_nz = NonZeroU32::new(burst).unwrap_or(rate_nz);
        Budget {
            limiter: Some(RateLimiter::direct(
                Quota::per_second(rate_nz).allow_burst(burst_nz),
            )),
            burst,
            bytes_per_sec,
        }
    }
}

impl ByteLimiter {
    pub fn new(bytes_per_sec: u64) -> ByteLimiter {
        ByteLimiter {
            current: std::sync::RwLock::new(std::sync::Arc::new(Budget::new(bytes_per_sec))),
        }
    }

    fn budget(&self) -> std::sync::Arc<Budget> {
        match self.current.read() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// From now on, `bytes_per_sec` (0: unlimited); a no-op when it is the rate already.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        if self.budget().bytes_per_sec == bytes_per_sec {
            return;
        }
        let new = std::sync::Arc::new(Budget::new(bytes_per_sec));
        match self.current.write() {
            Ok(mut b) => *b = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.budget().limiter.is_none()
    }

    /// Waits until `n` bytes may move.
    pub async fn take(&self, n: usize) {
        let mut left = n as u64;
        while left > 0 {
            // Each grant asks the budget in force now.
            let budget = self.budget();
            let Some(l) = &budget.limiter else { return };
            let step = left.min(budget.burst as u64) as u32;
            if let Some(step_nz) = NonZeroU32::new(step) {
                // `step` never exceeds the burst, so capacity is always sufficient.
                let _ = l.until_n_ready(step_nz).await;
            }
            left -= step as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unlimited_never_waits_and_limited_paces() {
        let u = ByteLimiter::new(0);
        assert!(u.is_unlimited());
        u.take(usize::MAX / 2).await;
        // 100 KiB/s with a 10 KiB burst: 60 KiB beyond the burst takes about half a second.
        let l = ByteLimiter::new(100 * 1024);
        let start = std::time::Instant::now();
        l.take(60 * 1024).await;
        let took = start.elapsed();
        assert!(took >= std::time::Duration::from_millis(400), "{took:?}");
        // Lifted: the next transfer does not wait.
        l.set_rate(0);
        assert!(l.is_unlimited());
        l.take(usize::MAX / 2).await;
        l.set_rate(100 * 1024);
        assert!(!l.is_unlimited());
    }
}
