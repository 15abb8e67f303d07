use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    hooks::Counters,
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

/// Sessions of persistent clients that are away.
///
/// Updraft patch 8: upstream kept an entry for every client id it ever saw (the session of a
/// persistent client, the connection events of a clean one) for the life of the process, so
/// 10,000 random client ids cost 7 MiB that were never freed. Now only persistent sessions are
/// kept, each for `expiry` at most, and never more than `max` of them (the oldest goes first).
pub struct Graveyard {
    connections: HashMap<String, (Instant, SavedState)>,
    /// When each session was saved, oldest first. An entry whose session was taken back or saved
    /// again since is stale and skipped.
    order: VecDeque<(Instant, String)>,
    expiry: Option<Duration>,
    max: usize,
    counters: Option<Arc<Counters>>,
}

impl Graveyard {
    pub fn new(expiry: Option<Duration>, max: Option<usize>, counters: Option<Arc<Counters>>) -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
            order: VecDeque::new(),
            expiry,
            max: max.unwrap_or(usize::MAX),
            counters,
        }
    }

    /// Takes the saved session of a client id, unless it has expired.
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        let now = Instant::now();
        self.sweep(now);
        let (_, saved) = self.connections.remove(id)?;
        self.publish_count();
        Some(saved)
    }

    /// Save connection tracker
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            unacked_pubrels,
        };

        let now = Instant::now();
        self.order.push_back((now, id.clone()));
        self.connections.insert(
            id,
            (
                now,
                SavedState {
                    session_state: Some(session_state),
                    metrics,
                },
            ),
        );
        self.sweep(now);
        self.publish_count();
    }

    /// Forgets expired sessions and, over the most kept, the oldest.
    fn sweep(&mut self, now: Instant) {
        while let Some((saved_at, id)) = self.order.front() {
            let live = self.connections.get(id).is_some_and(|(t, _)| t == saved_at);
            let expired = self.expiry.is_some_and(|e| now.duration_since(*saved_at) >= e);
            if live && !expired && self.connections.len() <= self.max {
                break;
            }
            if live {
                self.connections.remove(id);
                if let Some(c) = &self.counters {
                    c.expired_sessions.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.order.pop_front();
        }
        // Stale entries behind a live one (a client that comes and goes) must not pile up.
        if self.order.len() > 2 * self.connections.len() + 64 {
            let mut order: Vec<_> = self.connections.iter().map(|(id, (t, _))| (*t, id.clone())).collect();
            order.sort();
            self.order = order.into();
        }
    }

    fn publish_count(&self) {
        if let Some(c) = &self.counters {
            c.saved_sessions.store(self.connections.len() as u64, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(g: &mut Graveyard, id: &str) {
        g.save_state(Tracker::new(id.to_owned()), HashSet::new(), ConnectionEvents::default(), VecDeque::new());
    }

    #[test]
    fn the_oldest_sessions_go_first_when_more_than_the_most_are_saved() {
        let counters = Arc::new(Counters::default());
        let mut g = Graveyard::new(None, Some(3), Some(counters.clone()));
        for id in ["a", "b", "c", "d", "e"] {
            save(&mut g, id);
        }
        assert!(g.retrieve("a").is_none() && g.retrieve("b").is_none());
        assert!(g.retrieve("e").is_some());
        assert_eq!(counters.expired_sessions.load(Ordering::Relaxed), 2);
        assert_eq!(counters.saved_sessions.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_expired_session_is_not_restored_and_a_flapping_client_does_not_grow_the_queue() {
        let mut g = Graveyard::new(Some(Duration::from_millis(50)), None, None);
        save(&mut g, "old");
        std::thread::sleep(Duration::from_millis(60));
        assert!(g.retrieve("old").is_none());
        let mut g = Graveyard::new(None, None, None);
        save(&mut g, "steady");
        for _ in 0..10_000 {
            save(&mut g, "flapping");
            assert!(g.retrieve("flapping").is_some());
        }
        assert!(g.order.len() <= 2 * g.connections.len() + 65, "{}", g.order.len());
    }
}
