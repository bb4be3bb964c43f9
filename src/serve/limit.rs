//! Bandwidth limits: a shared byte budget per second (WAN fetches, LAN serving).
//!
//! Owns the wrapper around `governor` that meters bytes rather than requests: one limiter is
//! shared by every transfer it governs, so `serve.max_bytes_per_sec` is a budget for all
//! clients together. It must never buffer or touch the bytes themselves: callers ask for
//! permission to move `n` bytes and then move them.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A byte-rate limiter; 0 bytes per second means unlimited.
pub struct ByteLimiter {
    limiter: Option<DefaultDirectRateLimiter>,
    /// Largest single grant: a tenth of a second's worth (at least 4 KiB), so transfers stay
    /// smooth and concurrent ones interleave.
    burst: u32,
}

impl ByteLimiter {
    pub fn new(bytes_per_sec: u64) -> ByteLimiter {
        let rate = bytes_per_sec.min(u32::MAX as u64) as u32;
        let Some(rate_nz) = NonZeroU32::new(rate) else {
            return ByteLimiter {
                limiter: None,
                burst: 0,
            };
        };
        let burst = (rate / 10).max(4096).min(rate);
        let burst_nz = NonZeroU32::new(burst).unwrap_or(rate_nz);
        ByteLimiter {
            limiter: Some(RateLimiter::direct(
                Quota::per_second(rate_nz).allow_burst(burst_nz),
            )),
            burst,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.limiter.is_none()
    }

    /// Waits until `n` bytes may move.
    pub async fn take(&self, n: usize) {
        let Some(l) = &self.limiter else { return };
        let mut left = n as u64;
        while left > 0 {
            let step = left.min(self.burst as u64) as u32;
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
    }
}
