//! The last hour of a few counters, one point a minute, for the status pages' plots.
//!
//! Owns the per-minute ring: a background task of each server ([`sample_every`]) reads its
//! counters (bytes served and fetched, heartbeats and events received) about once a
//! [`SAMPLE_PERIOD`], and each reading at least a minute after the last closes a slot holding
//! the counters' increase and the seconds it spans. A page reads per-second rates of the
//! closed slots plus the minute still running (from the counters' live values), so a server
//! up for ten seconds already plots one point. It must never hold more than [`MINUTES`]
//! slots, never read a counter itself (the caller hands values in), and never take time from
//! anywhere but its callers, so its logic is tested with injected times.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::shutdown::Shutdown;

/// Slots kept: one an hour's minute, so a plot shows the last hour.
pub const MINUTES: usize = 60;
/// How long a slot spans at least.
pub const SLOT_S: u64 = 60;
/// How often the sampler reads the counters; a slot closes at the first reading at least
/// [`SLOT_S`] after it opened, so a slot spans 60 to 65 s.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// One closed (or running) minute.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot<const K: usize> {
    /// Unix seconds it opened and closed.
    start_s: i64,
    end_s: i64,
    /// How much each counter grew in it.
    deltas: [u64; K],
}

/// The per-minute history of `K` counters.
#[derive(Debug, Clone)]
pub struct History<const K: usize> {
    /// When the running slot opened and the counters' values then; None before the first
    /// reading.
    open: Option<(i64, [u64; K])>,
    /// Closed slots, oldest first, at most [`MINUTES`].
    slots: VecDeque<Slot<K>>,
}

impl<const K: usize> Default for History<K> {
    fn default() -> Self {
        History {
            open: None,
            slots: VecDeque::with_capacity(MINUTES),
        }
    }
}

/// A point of one counter: `x` minutes from now (-60 to 0) and its rate per second.
pub type Point = (f64, f64);

impl<const K: usize> History<K> {
    /// Takes a reading of the counters at `now_s` (Unix seconds): the first opens a slot; one
    /// at least [`SLOT_S`] later closes it and opens the next. A counter that went back (a
    /// restart of its source) counts as grown by nothing.
    pub fn observe(&mut self, now_s: i64, values: [u64; K]) {
        let Some((start_s, at_start)) = self.open else {
            self.open = Some((now_s, values));
            return;
        };
        if now_s < start_s {
            // The clock went back: start over from here rather than plot a negative span.
            self.open = Some((now_s, values));
            return;
        }
        if now_s - start_s < SLOT_S as i64 {
            return;
        }
        if self.slots.len() == MINUTES {
            self.slots.pop_front();
        }
        self.slots.push_back(Slot {
            start_s,
            end_s: now_s,
            deltas: deltas(&at_start, &values),
        });
        self.open = Some((now_s, values));
    }

    /// Per counter, its points over the last hour at `now_s`: one a closed slot (at its end)
    /// and one for the running slot from the counters' `live` values, each a rate per second.
    pub fn rates(&self, now_s: i64, live: [u64; K]) -> [Vec<Point>; K] {
        let mut out: [Vec<Point>; K] = std::array::from_fn(|_| Vec::with_capacity(MINUTES + 1));
        let horizon = now_s - (MINUTES as i64) * (SLOT_S as i64);
        let running = self.open.and_then(|(start_s, at_start)| {
            (now_s > start_s).then(|| Slot {
                start_s,
                end_s: now_s,
                deltas: deltas(&at_start, &live),
            })
        });
        for slot in self.slots.iter().chain(running.iter()) {
            if slot.end_s <= horizon || slot.end_s > now_s {
                continue;
            }
            let span = (slot.end_s - slot.start_s).max(1) as f64;
            let x = (slot.end_s - now_s) as f64 / SLOT_S as f64;
            for (k, series) in out.iter_mut().enumerate() {
                series.push((x, slot.deltas[k] as f64 / span));
            }
        }
        out
    }

    /// Per counter, its growth over about the last `seconds` at `now_s`: the running slot
    /// (from `live`) and every closed slot that ended within them (whole slots, so up to a
    /// minute more than asked).
    pub fn growth_over(&self, now_s: i64, seconds: u64, live: [u64; K]) -> [u64; K] {
        let since = now_s.saturating_sub(i64::try_from(seconds).unwrap_or(i64::MAX));
        let mut out = match self.open {
            Some((_, at_start)) => deltas(&at_start, &live),
            None => [0; K],
        };
        for slot in self.slots.iter().rev().take_while(|s| s.end_s > since) {
            for (k, v) in out.iter_mut().enumerate() {
                *v = v.saturating_add(slot.deltas[k]);
            }
        }
        out
    }

    /// Closed slots held (at most [`MINUTES`]).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot closed yet.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

fn deltas<const K: usize>(from: &[u64; K], to: &[u64; K]) -> [u64; K] {
    std::array::from_fn(|k| to[k].saturating_sub(from[k]))
}

/// Reads `read()` into `history` every [`SAMPLE_PERIOD`] (at once first) until `shutdown`.
pub async fn sample_every<const K: usize>(
    history: Arc<Mutex<History<K>>>,
    read: impl Fn() -> [u64; K] + Send + 'static,
    shutdown: Shutdown,
) {
    loop {
        let now = chrono::Utc::now().timestamp();
        let values = read();
        match history.lock() {
            Ok(mut h) => h.observe(now, values),
            Err(_) => {
                tracing::warn!("page history lock poisoned; plots stop here");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_PERIOD) => {}
            _ = shutdown.clone().wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_closes_a_minute_after_it_opened_and_holds_the_growth() {
        let mut h = History::<2>::default();
        h.observe(1000, [10, 0]);
        h.observe(1030, [40, 5]);
        assert!(h.is_empty(), "30 s is not a minute");
        h.observe(1060, [70, 6]);
        assert_eq!(h.len(), 1);
        let [a, b] = h.rates(1060, [70, 6]);
        assert_eq!(a, vec![(0.0, 1.0)], "60 grown over 60 s");
        assert_eq!(b, vec![(0.0, 0.1)]);
    }

    #[test]
    fn the_running_minute_is_a_point_of_its_own() {
        let mut h = History::<1>::default();
        h.observe(0, [0]);
        // Ten seconds after the start: one point, the rate so far.
        assert_eq!(h.rates(10, [50]), [vec![(0.0, 5.0)]]);
        // Nothing at the instant of the first reading (no span yet).
        assert_eq!(h.rates(0, [0]), [vec![]]);
        h.observe(65, [65]);
        let [p] = h.rates(95, [95]);
        assert_eq!(p, vec![(-0.5, 1.0), (0.0, 1.0)]);
    }

    #[test]
    fn the_ring_keeps_the_last_hour_and_no_more() {
        let mut h = History::<1>::default();
        for m in 0..=200i64 {
            h.observe(m * 60, [m as u64 * 120]);
        }
        assert_eq!(h.len(), MINUTES);
        let [p] = h.rates(200 * 60, [200 * 120]);
        assert_eq!(
            p.len(),
            MINUTES,
            "60 closed slots, the running one has no span yet"
        );
        assert!(p
            .iter()
            .all(|(x, y)| (-60.0..=0.0).contains(x) && *y == 2.0));
        // An hour and more later with no reading, nothing old is plotted.
        let [late] = h.rates(200 * 60 + 3601, [200 * 120]);
        assert_eq!(
            late.len(),
            1,
            "only the running slot remains within the hour"
        );
    }

    #[test]
    fn growth_over_an_interval_adds_the_slots_that_ended_in_it_and_the_running_one() {
        let mut h = History::<1>::default();
        for m in 0..=10i64 {
            h.observe(m * 60, [m as u64 * 10]);
        }
        // Slots end at 60, 120, ..., 600; the running one opened at 600.
        assert_eq!(h.growth_over(630, 0, [103]), [3]);
        assert_eq!(
            h.growth_over(630, 60, [103]),
            [13],
            "the slot ending at 600"
        );
        assert_eq!(
            h.growth_over(630, 150, [103]),
            [23],
            "the slots ending at 540 and 600"
        );
        assert_eq!(h.growth_over(630, u64::MAX, [103]), [103]);
        assert_eq!(History::<1>::default().growth_over(5, 60, [9]), [0]);
    }

    #[test]
    fn counters_going_back_or_the_clock_going_back_plot_nothing_negative() {
        let mut h = History::<1>::default();
        h.observe(100, [500]);
        h.observe(160, [3]);
        assert_eq!(h.rates(160, [3]), [vec![(0.0, 0.0)]]);
        h.observe(50, [3]);
        h.observe(80, [33]);
        let [p] = h.rates(80, [33]);
        assert!(p.iter().all(|(_, y)| *y >= 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_reads_at_once_and_stops_at_shutdown() {
        let (trigger, shutdown) = crate::http::shutdown::shutdown_pair();
        let history = Arc::new(Mutex::new(History::<1>::default()));
        let task = tokio::spawn(sample_every(history.clone(), || [7], shutdown));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            history.lock().unwrap().open.is_some(),
            "the first reading opened a slot"
        );
        trigger.trigger();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the sampler stops at shutdown")
            .unwrap();
    }
}
