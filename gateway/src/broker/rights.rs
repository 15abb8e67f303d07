//! Per-user topic rights on the local broker: `[broker.users.NAME] publish = […], subscribe = […]`
//! and `[broker.anonymous]`, enforced in the router (rumqttd patch 7) and counted on `/metrics`.
//!
//! A right is an MQTT filter. A publish is allowed when its topic matches one of the user's
//! `publish` filters; a subscription when every topic its filter could match is covered by one of
//! the user's `subscribe` filters (so `updraft/press/#` lies within `updraft/#`, but `#` does
//! not). A list left out does not restrict; an empty list allows nothing. Writing to equipment
//! through `updraft/{device}/{tag}/set` is a publish like any other, so "who may write" is a
//! `publish` right.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::BrokerSection;
use crate::metrics::Counter;

/// One principal's filters; `None` = unrestricted.
#[derive(Debug, Default)]
struct Grant {
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
}

/// The rights of every configured user and of anonymous clients, and the refusal counters.
#[derive(Debug)]
pub struct TopicRights {
    users: HashMap<String, Grant>,
    anonymous: Grant,
    pub denied_publish: Arc<Counter>,
    pub denied_subscribe: Arc<Counter>,
}

impl TopicRights {
    /// `None` when the config gives no rights at all: the router then asks nothing.
    pub fn new(cfg: &BrokerSection, denied_publish: Arc<Counter>, denied_subscribe: Arc<Counter>) -> Option<Self> {
        let users: HashMap<String, Grant> = cfg
            .users
            .iter()
            .filter(|(_, u)| u.publish.is_some() || u.subscribe.is_some())
            .map(|(name, u)| (name.clone(), Grant { publish: u.publish.clone(), subscribe: u.subscribe.clone() }))
            .collect();
        let anonymous = cfg
            .anonymous
            .as_ref()
            .map(|a| Grant { publish: a.publish.clone(), subscribe: a.subscribe.clone() })
            .unwrap_or_default();
        if users.is_empty() && anonymous.publish.is_none() && anonymous.subscribe.is_none() {
            return None;
        }
        Some(TopicRights { users, anonymous, denied_publish, denied_subscribe })
    }

    fn grant(&self, user: Option<&str>) -> Option<&Grant> {
        match user {
            None => Some(&self.anonymous),
            Some(u) => self.users.get(u),
        }
    }
}

impl rumqttd::Rights for TopicRights {
    fn may_publish(&self, user: Option<&str>, topic: &str) -> bool {
        let filters = self.grant(user).and_then(|g| g.publish.as_deref());
        decide(filters, topic, &self.denied_publish)
    }

    fn may_subscribe(&self, user: Option<&str>, filter: &str) -> bool {
        let filters = self.grant(user).and_then(|g| g.subscribe.as_deref());
        decide(filters, filter, &self.denied_subscribe)
    }
}

/// Whether `requested` lies within one of `filters` (`None`: unrestricted); a refusal is counted.
fn decide(filters: Option<&[String]>, requested: &str, denied: &Counter) -> bool {
    let allowed = filters.is_none_or(|fs| fs.iter().any(|f| within(requested, f)));
    if !allowed {
        denied.inc();
    }
    allowed
}

/// Whether everything `requested` (a topic or a filter) can match is matched by `allowed`.
pub fn within(requested: &str, allowed: &str) -> bool {
    let mut req = requested.split('/');
    for a in allowed.split('/') {
        if a == "#" {
            // `a/#` covers `a` itself and everything below it.
            return true;
        }
        match req.next() {
            None | Some("#") => return false,
            Some("+") if a != "+" => return false,
            Some(level) if a != "+" && a != level => return false,
            Some(_) => {}
        }
    }
    req.next().is_none()
}

/// Why a topic right is not a valid MQTT filter, for `updraft check`.
pub fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("an empty filter matches nothing; use \"#\" for everything or leave the list out".into());
    }
    if f.contains('\0') {
        return Err("a filter cannot contain NUL".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!("`#` must be a whole level and the last one (e.g. `updraft/#`), not `{f}`"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`+` must be a whole level (e.g. `updraft/+/speed`), not `{f}`"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_lies_within_a_right_only_when_all_it_matches_is_covered() {
        for (req, allowed, want) in [
            ("updraft/press/speed", "updraft/#", true),
            ("updraft", "updraft/#", true),
            ("updraft/press/#", "updraft/#", true),
            ("#", "updraft/#", false),
            ("updraft/+/speed", "updraft/+/speed", true),
            ("updraft/+/speed", "updraft/press/speed", false),
            ("updraft/press/speed", "updraft/+/speed", true),
            ("updraft/press/#", "updraft/+/speed", false),
            ("updraft/press/speed/set", "updraft/+/+/set", true),
            ("updraft/press/speed", "updraft/+/+/set", false),
            ("updraft/press", "updraft/press/speed", false),
            ("updraft/press/speed/x", "updraft/press/speed", false),
            ("anything/at/all", "#", true),
        ] {
            assert_eq!(within(req, allowed), want, "{req} within {allowed}");
        }
    }

    #[test]
    fn malformed_rights_are_refused_with_the_rule() {
        assert!(check_filter("updraft/#").is_ok());
        assert!(check_filter("updraft/+/speed").is_ok());
        assert!(check_filter("updraft/#/set").unwrap_err().contains("last"));
        assert!(check_filter("updraft/press*").is_ok(), "`*` is an ordinary character in MQTT");
        assert!(check_filter("updraft/pr+ss").unwrap_err().contains("whole level"));
        assert!(check_filter("").is_err());
    }
}
