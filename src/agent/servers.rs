//! Which server an agent talks to: the `--server` list it starts with, the settings'
//! `management_servers` once it has them, failing over and moving back.
//!
//! Owns the order of the servers (lower priority first, random among equal priorities, drawn
//! once per list), which ones did not answer lately (each skipped for a backoff of 5 s doubling
//! to 60 s, then tried again first), the server in use and why it was chosen. With an empty
//! `management_servers`, or none of it answering, the `--server` list is the fallback. It
//! must never send a request itself: the agent tries [`Servers::candidates`] in order and
//! reports [`Servers::answered`] or [`Servers::failed`].

use std::collections::HashMap;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::time::Instant;

use super::comms::ServerEntry;
use super::wire::normalize_target;

/// A server that did not answer is skipped this long at first.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// ... doubling up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Down {
    until: Instant,
    failures: u32,
}

/// The server list of one agent.
#[derive(Debug)]
pub struct Servers {
    initial: Vec<String>,
    /// The settings' list as last heard (to notice a change).
    heard: Vec<ServerEntry>,
    /// Its URLs in the order to try.
    managed: Vec<String>,
    down: HashMap<String, Down>,
    in_use: Option<String>,
    why: String,
}

impl Servers {
    /// Starts from `initial` (already checked URLs, at least one).
    pub fn new(initial: Vec<String>) -> Servers {
        Servers {
            initial,
            heard: Vec::new(),
            managed: Vec::new(),
            down: HashMap::new(),
            in_use: None,
            why: "not connected yet".into(),
        }
    }

    /// Takes the settings' `management_servers` in; a new list is ordered anew. Entries whose
    /// URL is not `http(s)://host[:port][/path]` are skipped (logged).
    pub fn set_list(&mut self, entries: &[ServerEntry]) {
        if entries == self.heard.as_slice() {
            return;
        }
        self.heard = entries.to_vec();
        let mut valid: Vec<(u32, String)> = entries
            .iter()
            .filter_map(|e| match normalize_target(&e.url) {
                Ok(url) => Some((e.priority, url)),
                Err(reason) => {
                    tracing::warn!(url = %e.url, %reason, "skipping a management_servers entry");
                    None
                }
            })
            .collect();
        let mut rng = rand::rng();
        valid.shuffle(&mut rng);
        valid.sort_by_key(|(p, _)| *p);
        let mut seen = std::collections::HashSet::new();
        self.managed = valid
            .into_iter()
            .map(|(_, u)| u)
            .filter(|u| seen.insert(u.clone()))
            .collect();
    }

    /// The servers to try, in order: those not skipped (the settings' list, then `--server`),
    /// then the skipped ones as a last resort.
    pub fn candidates(&self) -> Vec<String> {
        let now = Instant::now();
        let mut all: Vec<String> = self.managed.clone();
        for s in &self.initial {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        let (up, down): (Vec<String>, Vec<String>) = all
            .into_iter()
            .partition(|s| self.down.get(s).is_none_or(|d| d.until <= now));
        up.into_iter().chain(down).collect()
    }

    /// `url` answered: it is the server in use.
    pub fn answered(&mut self, url: &str) {
        self.down.remove(url);
        let why = match self.managed.iter().position(|s| s == url) {
            Some(0) => "first of management_servers".to_string(),
            Some(n) => format!(
                "management_servers entry {} of {}; the ones before it did not answer",
                n + 1,
                self.managed.len()
            ),
            None if self.managed.is_empty() => "--server (management_servers is empty)".to_string(),
            None => "--server fallback: no management_servers entry answered".to_string(),
        };
        if self.in_use.as_deref() != Some(url) {
            tracing::info!(server = %url, %why, "server in use");
        }
        self.in_use = Some(url.to_string());
        self.why = why;
    }

    /// `url` did not answer: skip it for a while.
    pub fn failed(&mut self, url: &str) {
        let d = self.down.entry(url.to_string()).or_insert(Down {
            until: Instant::now(),
            failures: 0,
        });
        d.failures = d.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << d.failures.saturating_sub(1).min(4))
            .min(MAX_BACKOFF);
        d.until = Instant::now() + backoff;
        if self.in_use.as_deref() == Some(url) {
            tracing::warn!(server = %url, "server in use did not answer; trying the next");
        }
    }

    /// The server in use, if one answered.
    pub fn in_use(&self) -> Option<&str> {
        self.in_use.as_deref()
    }

    /// Why it is the one.
    pub fn why(&self) -> &str {
        &self.why
    }

    /// The server in use first, then the other candidates (for a download to try the next
    /// server after a mismatch).
    pub fn in_use_first(&self) -> Vec<String> {
        let mut list = self.candidates();
        if let Some(u) = &self.in_use {
            list.retain(|s| s != u);
            list.insert(0, u.clone());
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, priority: u32) -> ServerEntry {
        ServerEntry {
            url: url.into(),
            priority,
        }
    }

    #[tokio::test]
    async fn lower_priority_first_then_the_fallback_and_a_silent_one_goes_last() {
        let mut s = Servers::new(vec!["http://127.0.0.1:1".into()]);
        assert_eq!(s.candidates(), vec!["http://127.0.0.1:1"]);
        s.set_list(&[
            entry("http://127.0.0.1:3/", 2),
            entry("http://127.0.0.1:2", 1),
            entry("not a url", 0),
        ]);
        assert_eq!(
            s.candidates(),
            vec![
                "http://127.0.0.1:2",
                "http://127.0.0.1:3",
                "http://127.0.0.1:1"
            ]
        );
        s.failed("http://127.0.0.1:2");
        assert_eq!(s.candidates()[0], "http://127.0.0.1:3");
        assert_eq!(s.candidates()[2], "http://127.0.0.1:2");
        s.answered("http://127.0.0.1:3");
        assert!(s.why().contains("entry 2 of 2"), "{}", s.why());
        s.answered("http://127.0.0.1:1");
        assert!(s.why().contains("fallback"), "{}", s.why());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_did_not_answer_is_tried_first_again_after_its_backoff() {
        let mut s = Servers::new(vec!["http://127.0.0.1:1".into()]);
        s.set_list(&[entry("http://127.0.0.1:2", 1)]);
        s.failed("http://127.0.0.1:2");
        assert_eq!(s.candidates()[0], "http://127.0.0.1:1");
        tokio::time::advance(FIRST_BACKOFF).await;
        assert_eq!(s.candidates()[0], "http://127.0.0.1:2");
    }

    #[test]
    fn equal_priorities_are_drawn_at_random() {
        let list = [
            entry("http://127.0.0.1:2", 1),
            entry("http://127.0.0.1:3", 1),
        ];
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let mut s = Servers::new(vec!["http://127.0.0.1:1".into()]);
            s.set_list(&list);
            firsts.insert(s.candidates()[0].clone());
        }
        assert_eq!(firsts.len(), 2);
    }
}
