//! Report by exception, for every driver: `publish = "on-change"` with an optional `deadband` and
//! `heartbeat` keeps unchanged readings from leaving the driver, so neither the broker, the
//! plugins nor the cloud pay for them. Applied per tag, before the hub.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer};

use crate::base::point::{Point, Quality, Value};
use crate::config::Dur;

/// A device's or a tag's `publish`, `deadband` and `heartbeat` keys.
pub type Keys = (Option<Publish>, Option<Deadband>, Option<Dur>);

/// When a tag's reading is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Publish {
    /// Every reading.
    Always,
    /// Only a reading that differs from the last one published (past `deadband`), a change of
    /// quality, or the last value again after `heartbeat`.
    OnChange,
}

/// How far a number must move to count as changed: an absolute amount (`0.5`) or a percentage of
/// the last published value (`"2%"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deadband {
    Absolute(f64),
    Percent(f64),
}

impl<'de> Deserialize<'de> for Deadband {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Deadband;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a number (absolute, e.g. 0.5) or a percentage such as "2%""#)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Deadband, E> {
                if v.is_finite() && v >= 0.0 {
                    Ok(Deadband::Absolute(v))
                } else {
                    Err(E::custom("a deadband must be a number of at least 0"))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Deadband, E> {
                self.visit_f64(v as f64)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Deadband, E> {
                let p = s.trim().strip_suffix('%').and_then(|n| n.trim().parse::<f64>().ok());
                match p {
                    Some(p) if p.is_finite() && (0.0..=1000.0).contains(&p) => Ok(Deadband::Percent(p)),
                    _ => Err(E::custom(format!(
                        r#"invalid deadband "{s}"; write a number (0.5) or a percentage ("2%")"#
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The report settings of one tag, its own keys over its device's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub on_change: bool,
    pub deadband: Option<Deadband>,
    pub heartbeat: Option<Duration>,
}

impl Rule {
    /// Combines a tag's keys with its device's. Setting a deadband or heartbeat (on either) means
    /// on-change unless `publish` says otherwise.
    pub fn resolve(device: Keys, tag: Keys) -> Rule {
        let deadband = tag.1.or(device.1);
        let heartbeat = tag.2.or(device.2).map(|d| d.0);
        let publish = tag.0.or(device.0).unwrap_or(if deadband.is_some() || heartbeat.is_some() {
            Publish::OnChange
        } else {
            Publish::Always
        });
        Rule { on_change: publish == Publish::OnChange, deadband, heartbeat }
    }
}

struct Last {
    value: Option<Value>,
    quality: Quality,
    error: Option<std::sync::Arc<str>>,
    at: Instant,
}

/// The filter of one device: the rule and the last published reading of each tag, by tag id.
pub struct Exceptions {
    rules: HashMap<u32, Rule>,
    last: HashMap<u32, Last>,
}

impl Exceptions {
    /// `rules` by registry id; tags that publish always may be left out. `None` when no tag
    /// reports by exception, so the common case costs nothing.
    /// The filter for a device's tags, each tag's keys over the device's (`(publish, deadband,
    /// heartbeat)`, by registry id).
    pub fn for_tags(device: Keys, tags: impl Iterator<Item = (u32, Keys)>) -> Option<Exceptions> {
        Exceptions::new(tags.map(|(id, keys)| (id, Rule::resolve(device, keys))).collect())
    }

    pub fn new(rules: HashMap<u32, Rule>) -> Option<Exceptions> {
        let rules: HashMap<u32, Rule> = rules.into_iter().filter(|(_, r)| r.on_change).collect();
        (!rules.is_empty()).then(|| Exceptions { rules, last: HashMap::new() })
    }

    /// Keeps the points that must be published, and remembers them.
    pub fn filter(&mut self, points: &mut Vec<Point>, now: Instant) {
        points.retain(|p| {
            let Some(rule) = self.rules.get(&p.key.id) else { return true };
            let publish = match self.last.get(&p.key.id) {
                None => true,
                Some(last) => {
                    last.quality != p.quality
                        || (p.quality == Quality::Bad && last.error != p.error)
                        || changed(last.value.as_ref(), p.value.as_ref(), rule.deadband)
                        || rule.heartbeat.is_some_and(|h| now.duration_since(last.at) >= h)
                }
            };
            if publish {
                self.last.insert(
                    p.key.id,
                    Last { value: p.value.clone(), quality: p.quality, error: p.error.clone(), at: now },
                );
            }
            publish
        });
    }
}

/// Whether a reading moved past the deadband from the last published one.
fn changed(last: Option<&Value>, new: Option<&Value>, deadband: Option<Deadband>) -> bool {
    let (Some(last), Some(new)) = (last, new) else { return last.is_some() != new.is_some() };
    // Booleans and text change or do not; only numbers have a deadband.
    let numeric = |v: &Value| !matches!(v, Value::Bool(_) | Value::String(_));
    match deadband {
        Some(band) if numeric(last) && numeric(new) => {
            let (a, b) = (last.as_f64(), new.as_f64());
            let limit = match band {
                Deadband::Absolute(d) => d,
                Deadband::Percent(p) => a.abs() * p / 100.0,
            };
            (b - a).abs() > limit || (limit == 0.0 && a != b)
        }
        _ => last != new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::Registry;

    #[test]
    fn constant_values_publish_once_plus_heartbeats_and_noise_stays_inside_the_deadband() {
        let r = Registry::default();
        let (c, n) = (r.intern("d", "const"), r.intern("d", "noisy"));
        let rule = |deadband| Rule { on_change: true, deadband, heartbeat: Some(Duration::from_secs(10)) };
        let mut x =
            Exceptions::new(HashMap::from([(c.id, rule(None)), (n.id, rule(Some(Deadband::Absolute(1.0))))])).unwrap();
        let t0 = Instant::now();
        let mut published = |v: f64, noisy: f64, at: u64| {
            let mut p =
                vec![Point::good(c.clone(), Value::Float(v), 0), Point::good(n.clone(), Value::Float(noisy), 0)];
            x.filter(&mut p, t0 + Duration::from_secs(at));
            p.iter().map(|p| p.key.tag.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(published(5.0, 100.0, 0), ["const", "noisy"], "first readings always go");
        assert_eq!(published(5.0, 100.6, 1), Vec::<String>::new(), "unchanged, and noise inside the band");
        assert_eq!(published(5.0, 101.2, 2), ["noisy"], "past the band from the last published value");
        assert_eq!(published(5.0, 101.2, 11), ["const"], "heartbeat of the constant one");
        assert_eq!(published(5.5, 101.2, 11), ["const"], "any change without a deadband");
    }

    #[test]
    fn deadbands_parse_as_numbers_or_percentages() {
        #[derive(Deserialize)]
        struct T {
            d: Deadband,
        }
        let t: T = toml::from_str("d = 0.5").unwrap();
        assert_eq!(t.d, Deadband::Absolute(0.5));
        let t: T = toml::from_str(r#"d = "2%""#).unwrap();
        assert_eq!(t.d, Deadband::Percent(2.0));
        assert!(toml::from_str::<T>(r#"d = "lots""#).is_err());
        assert!(toml::from_str::<T>("d = -1").is_err());
        assert!(changed(Some(&Value::Float(100.0)), Some(&Value::Float(102.5)), Some(Deadband::Percent(2.0))));
        assert!(!changed(Some(&Value::Float(100.0)), Some(&Value::Float(101.5)), Some(Deadband::Percent(2.0))));
    }
}
