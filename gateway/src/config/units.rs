//! Human units in config files: durations (`"500ms"`, `"1s"`, `"7d"`) and byte sizes (`"32MiB"`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as a string with a unit. Bare numbers are refused on purpose: `poll = 1`
/// could mean a second or a millisecond, and a wrong guess floods a serial bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn from_millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string such as "500ms", "1s", "5m" or "7d""#)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format!(
                        r#"invalid duration "{s}" ({e}); write a number with a unit, e.g. "500ms", "1s", "5m""#
                    ))
                })?;
                // Longer than any setting needs, and far from what `Instant + Duration` overflows on.
                if d > MAX_DURATION {
                    return Err(E::custom(format!(r#"duration "{s}" is too long; at most "3650d""#)));
                }
                Ok(Dur(d))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(r#"a duration needs a unit: write "{n}s" or "{n}ms" instead of {n}"#)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size written as a string with a unit (`"1GiB"`, `"512KiB"`, `"20MB"`) or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size such as "32MiB" or "1GiB""#)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Bytes, E> {
                let b = bytesize::ByteSize::from_str(s.trim()).map(|b| b.as_u64()).map_err(|e| {
                    E::custom(format!(r#"invalid size "{s}" ({e}); write e.g. "512KiB", "32MiB", "1GiB""#))
                })?;
                bounded(b)
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Bytes, E> {
                bounded(u64::try_from(n).map_err(|_| E::custom("a size cannot be negative"))?)
            }
        }
        d.deserialize_any(V)
    }
}

/// Longest duration accepted anywhere in the config: ten years.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86400);
/// Largest size accepted anywhere in the config: 1 PiB.
pub const MAX_BYTES: u64 = 1 << 50;

fn bounded<E: serde::de::Error>(b: u64) -> Result<Bytes, E> {
    if b > MAX_BYTES {
        return Err(E::custom("size is too large; at most \"1PiB\""));
    }
    Ok(Bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct T {
        d: Dur,
    }

    #[test]
    fn durations_need_units() {
        let t: T = toml::from_str(r#"d = "500ms""#).unwrap();
        assert_eq!(t.d.0, Duration::from_millis(500));
        let t: T = toml::from_str(r#"d = "7d""#).unwrap();
        assert_eq!(t.d.0, Duration::from_secs(7 * 86400));
        let e = toml::from_str::<T>("d = 5").unwrap_err();
        assert!(e.message().contains(r#""5s""#), "{e}");
        assert!(toml::from_str::<T>(r#"d = "fast""#).is_err());
        let e = toml::from_str::<T>(r#"d = "584542046090y""#).unwrap_err();
        assert!(e.message().contains("too long"), "{e}");
    }

    #[test]
    fn sizes_parse_iec_units() {
        #[derive(Debug, Deserialize)]
        struct S {
            b: Bytes,
        }
        let s: S = toml::from_str(r#"b = "32MiB""#).unwrap();
        assert_eq!(s.b.0, 32 << 20);
        let s: S = toml::from_str(r#"b = "1GiB""#).unwrap();
        assert_eq!(s.b.0, 1 << 30);
        assert!(toml::from_str::<S>(r#"b = "lots""#).is_err());
        assert!(toml::from_str::<S>(r#"b = "16EiB""#).is_err());
    }
}
