//! Updraft patch 2: hooks through which the embedding application shares the router's work.
//!
//! An application that publishes many retained values of its own (a gateway: one per tag, every
//! poll) need not push each one through the router when nobody subscribes to it. It keeps those
//! values itself and answers for them when a client subscribes ([`RetainedSource`]), and it asks
//! [`FilterWatch`] whether any subscription filter matches a topic before publishing live.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::protocol::{matches, Publish};

/// Retained messages kept by the embedding application instead of the router.
pub trait RetainedSource: Send + Sync {
    /// Appends every retained message whose topic matches `filter`.
    ///
    /// Called on the router thread when a subscription is made, at the moment its read cursor is
    /// set: a value the application stores before this call is returned here, and one it stores
    /// after can be told apart by [`FilterWatch::generation`], so nothing falls between the two.
    fn retained(&self, filter: &str, out: &mut Vec<Publish>);
}

/// The subscription filters the router keeps a log for. A filter stays once made (a persistent
/// session's filter keeps collecting while its client is away), as the router's logs do.
#[derive(Debug, Default)]
pub struct FilterWatch {
    generation: AtomicU64,
    filters: RwLock<Vec<String>>,
}

impl FilterWatch {
    /// Changes whenever a filter is added; an answer of [`FilterWatch::any_match`] stays true
    /// for as long as this stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a message on `topic` would reach any subscription filter.
    pub fn any_match(&self, topic: &str) -> bool {
        self.filters.read().iter().any(|f| matches(topic, f))
    }

    pub(crate) fn add(&self, filter: &str) {
        let mut filters = self.filters.write();
        filters.push(filter.to_owned());
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Updraft patch 7: per-user topic rights, decided by the embedder.
///
/// Asked for every publish and every subscription filter of a network client; the embedder's own
/// local links are never asked. `user` is the name the client logged in with, or `None` for a
/// client without a login (only possible where the broker takes anonymous clients). A refused
/// publish is dropped (acknowledged as MQTT 3.1.1 requires, with reason 0x87 in 5); a refused
/// filter gets SUBACK 0x80 (3.1.1) or 0x87 (5) and no retained messages.
pub trait Rights: Send + Sync {
    fn may_publish(&self, user: Option<&str>, topic: &str) -> bool;
    fn may_subscribe(&self, user: Option<&str>, filter: &str) -> bool;
}

/// Who a connection of the router is, for [`Rights`] (patch 7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Principal {
    /// A link the embedding application made itself: never restricted.
    #[default]
    Local,
    /// A network client without a login.
    Anonymous,
    /// A network client that logged in with this user name.
    User(String),
}

/// Updraft patch 8: what the router forgets or loses, for the embedder's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages a subscriber never got because it fell behind its filter's log, whose oldest
    /// segment was dropped to make room.
    pub lost_messages: AtomicU64,
    /// Persistent sessions kept for clients that are away (a gauge).
    pub saved_sessions: AtomicU64,
    /// Persistent sessions forgotten: older than the session expiry, or the oldest when more
    /// than the most kept were saved.
    pub expired_sessions: AtomicU64,
}

/// The hooks a router is built with; the default has none and behaves as upstream rumqttd.
#[derive(Clone, Default)]
pub struct Hooks {
    pub retained: Option<std::sync::Arc<dyn RetainedSource>>,
    pub filters: Option<std::sync::Arc<FilterWatch>>,
    pub rights: Option<std::sync::Arc<dyn Rights>>,
    pub counters: Option<std::sync::Arc<Counters>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("retained", &self.retained.is_some())
            .field("filters", &self.filters)
            .field("rights", &self.rights.is_some())
            .field("counters", &self.counters)
            .finish()
    }
}
