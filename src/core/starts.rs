//! Download starts of the current catalog revision over its window, for the status page.
//!
//! Owns, as plain data, a bounded per-second count of the content responses that start a download (a `GET`
//! whose bytes start at byte 0, so a client resuming with a `Range` is not counted twice) of
//! a blob in the current revision, from when that revision became available here. The window
//! is the `default` group's `randomization.window_s` as it reads when the revision is first
//! counted ([`NO_WINDOW_S`] when randomization is off); `serve::content` records into it. A
//! new revision starts a new count.
//! It must never grow past [`MAX_CELLS`] cells, never block a response on anything but one
//! short lock, and never decide anything about a download: it only counts.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

/// Cells of the count at most: one per second for every window up to a day; a longer window
/// (up to the week `randomization.window_s` allows) shares each cell among
/// `ceil(window / MAX_CELLS)` seconds. 86,400 `u32`s are 338 KiB, once per server.
pub const MAX_CELLS: u64 = 86_400;

/// The window counted when randomization is off (or its window is 0): the first hour.
pub const NO_WINDOW_S: u64 = 3600;

/// The download starts of one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartCount {
    pub revision: u64,
    /// When the revision became available at this server.
    pub available_at: DateTime<Utc>,
    /// The window counted over, in seconds.
    pub window_s: u64,
    /// Seconds each cell covers (1 for windows up to [`MAX_CELLS`] s).
    pub cell_s: u64,
    /// Starts per cell, from `available_at` on.
    pub cells: Vec<u32>,
    /// Starts after the window ended.
    pub after: u64,
}

impl StartCount {
    fn new(revision: u64, available_at: DateTime<Utc>, window_s: u64) -> StartCount {
        let window_s = window_s.max(1);
        let cell_s = window_s.div_ceil(MAX_CELLS).max(1);
        StartCount {
            revision,
            available_at,
            window_s,
            cell_s,
            cells: vec![0; window_s.div_ceil(cell_s) as usize],
            after: 0,
        }
    }

    /// Counts one start at `now` (a start before `available_at`, a clock step, counts in the
    /// first cell).
    pub fn count(&mut self, now: DateTime<Utc>) {
        let since = (now - self.available_at).num_seconds().max(0) as u64;
        match self.cells.get_mut((since / self.cell_s) as usize) {
            Some(c) if since < self.window_s => *c = c.saturating_add(1),
            _ => self.after += 1,
        }
    }

    /// All starts counted.
    pub fn total(&self) -> u64 {
        self.cells.iter().map(|c| *c as u64).sum::<u64>() + self.after
    }
}

/// The starts of the current revision (None before the first start of it).
#[derive(Debug, Default)]
pub struct Starts(Mutex<Option<StartCount>>);

impl Starts {
    /// Counts a start at `now` in `revision` (available since `available_at`, with
    /// `window_s`), starting over when the revision is not the one counted.
    pub fn record(
        &self,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: impl FnOnce() -> u64,
        now: DateTime<Utc>,
    ) {
        let Ok(mut held) = self.0.lock() else {
            return;
        };
        let count = match held.as_mut() {
            Some(c) if c.revision == revision => c,
            _ => held.insert(StartCount::new(revision, available_at, window_s())),
        };
        count.count(now);
    }

    /// A copy of the count, if it is of `revision`.
    pub fn of(&self, revision: u64) -> Option<StartCount> {
        let held = self.0.lock().ok()?;
        held.as_ref().filter(|c| c.revision == revision).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn starts_fall_in_their_second_of_the_window_and_after_it() {
        let starts = Starts::default();
        for s in [0, 0, 5, 59, 60, 500] {
            starts.record(3, at(0), || 60, at(s));
        }
        let c = starts.of(3).unwrap();
        assert_eq!((c.window_s, c.cell_s, c.cells.len()), (60, 1, 60));
        assert_eq!((c.cells[0], c.cells[5], c.cells[59]), (2, 1, 1));
        assert_eq!(c.after, 2);
        assert_eq!(c.total(), 6);
        assert!(starts.of(2).is_none());
    }

    #[test]
    fn a_new_revision_starts_over() {
        let starts = Starts::default();
        starts.record(1, at(0), || 60, at(1));
        starts.record(2, at(10), || 30, at(11));
        assert!(starts.of(1).is_none());
        let c = starts.of(2).unwrap();
        assert_eq!((c.window_s, c.total(), c.cells[1]), (30, 1, 1));
    }

    #[test]
    fn a_week_long_window_stays_within_the_bound() {
        let mut c = StartCount::new(1, at(0), 604_800);
        assert_eq!(c.cell_s, 7);
        assert!(c.cells.len() as u64 <= MAX_CELLS);
        c.count(at(604_799));
        c.count(at(-5));
        assert_eq!((c.cells[c.cells.len() - 1], c.cells[0], c.after), (1, 1, 0));
    }
}
