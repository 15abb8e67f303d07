//! The compact record format of the store-and-forward buffer, and its tag dictionary.
//!
//! One record holds the points of one hub batch. Names are not repeated per point: each tag gets a
//! small id from the sink's dictionary (`tags.jsonl` beside the segments, append-only, made durable
//! before any record that uses a new id), so a typical reading costs 6–9 bytes on disk:
//!
//! ```text
//! record = varint count, zigzag base_ts, point*, [zigzag (buffered_at - base_ts)]
//! point  = varint tag_id, zigzag (ts - previous ts), kind u8, value
//! kind   = low 4 bits: value type; bits 4-6: decimal exponent; bit 7: bad quality
//! ```
//!
//! `buffered_at` is the sink's buffer clock when the record was appended (see `buffer::Clock`):
//! what `max_age` measures, so a device clock that is wrong cannot expire a backlog. It is one or
//! two bytes per record while the clocks agree. Records written before it existed end after the
//! points and are aged by their points' timestamps.
//!
//! Text values are stored length-prefixed (`varint len, UTF-8 bytes`), so numbers pay nothing
//! for them.
//!
//! A float that is a short decimal (21.7, 0.125) is stored as its integer mantissa and exponent
//! (`217`, 1) — exactly, checked by converting back — because scaled register values nearly always
//! are; anything else keeps its 8 raw bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::base::point::{Point, Quality, TagKey, Value};

const NONE: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const UINT: u8 = 4;
const F32: u8 = 5;
const F64: u8 = 6;
const DECIMAL: u8 = 7;
const MESSAGE: u8 = 8;
/// UTF-8 text, length-prefixed. Text is rare beside numbers (a serial number, a recipe name) and
/// changes seldom, so it is stored as is rather than interned.
const TEXT: u8 = 9;
const BAD: u8 = 0x80;

const POW10: [f64; 8] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

/// A tag as the dictionary knows it, independent of this process's interning.
#[derive(Debug, PartialEq, Eq)]
pub struct DictEntry {
    pub device: Arc<str>,
    pub tag: Arc<str>,
    /// The point's topic on the local broker.
    pub topic: Arc<str>,
}

/// The sink's tag dictionary: store id → names, persisted as JSON lines `[id, device, tag, topic]`.
#[derive(Debug)]
pub struct Dict {
    path: PathBuf,
    file: Option<File>,
    by_topic: HashMap<Arc<str>, u32>,
    entries: Arc<RwLock<Vec<Arc<DictEntry>>>>,
    /// Registry id → store id, so the hot path does not hash names.
    cache: Vec<Option<u32>>,
    /// Lines not yet on disk (the disk refused them); written before any further record.
    unwritten: Vec<u8>,
}

impl Dict {
    /// Loads the dictionary; an unparsable last line (a torn write) is cut.
    pub fn open(dir: &Path) -> io::Result<Dict> {
        let path = dir.join("tags.jsonl");
        let mut entries: Vec<Arc<DictEntry>> = Vec::new();
        let mut by_topic = HashMap::new();
        let mut valid_len = 0u64;
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                let parsed: Option<(u32, String, String, String)> = serde_json::from_slice(&line).ok();
                let Some((id, device, tag, topic)) = parsed else { break };
                if id as usize != entries.len() {
                    break;
                }
                let e = Arc::new(DictEntry { device: device.into(), tag: tag.into(), topic: topic.into() });
                by_topic.insert(e.topic.clone(), id);
                entries.push(e);
                valid_len += line.len() as u64 + 1;
            }
            OpenOptions::new().write(true).open(&path)?.set_len(valid_len)?;
        }
        Ok(Dict {
            path,
            file: None,
            by_topic,
            entries: Arc::new(RwLock::new(entries)),
            cache: Vec::new(),
            unwritten: Vec::new(),
        })
    }

    /// The entries by id, shared with the reader side.
    pub fn entries(&self) -> Arc<RwLock<Vec<Arc<DictEntry>>>> {
        self.entries.clone()
    }

    fn id_of(&mut self, key: &TagKey) -> u32 {
        if let Some(Some(id)) = self.cache.get(key.id as usize) {
            return *id;
        }
        let topic = String::from_utf8_lossy(&key.topic);
        let id = match self.by_topic.get(topic.as_ref()) {
            Some(id) => *id,
            None => {
                let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
                let id = entries.len() as u32;
                let e = Arc::new(DictEntry { device: key.device.clone(), tag: key.tag.clone(), topic: topic.into() });
                let _ = serde_json::to_writer(&mut self.unwritten, &(id, &*e.device, &*e.tag, &*e.topic));
                self.unwritten.push(b'\n');
                self.by_topic.insert(e.topic.clone(), id);
                entries.push(e);
                id
            }
        };
        if self.cache.len() <= key.id as usize {
            self.cache.resize(key.id as usize + 1, None);
        }
        self.cache[key.id as usize] = Some(id);
        id
    }

    /// Makes new entries durable. Must succeed before a record that uses them is appended.
    pub fn persist(&mut self) -> io::Result<()> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        let f = self.file.as_mut().expect("opened above");
        let before = f.metadata()?.len();
        if let Err(e) = f.write_all(&self.unwritten).and_then(|_| f.sync_data()) {
            // Cut a partial line so the file stays a sequence of whole entries.
            let _ = f.set_len(before);
            return Err(e);
        }
        self.unwritten.clear();
        Ok(())
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The exponent and mantissa of a float that is exactly a short decimal.
fn as_decimal(f: f64) -> Option<(u8, i64)> {
    if !f.is_finite() {
        return None;
    }
    POW10.iter().enumerate().find_map(|(k, p)| {
        let m = (f * p).round();
        (m.abs() < 9.0e15 && m / p == f && (m != 0.0 || f.to_bits() == 0)).then_some((k as u8, m as i64))
    })
}

/// Encodes the points of one batch into `out` (cleared first), stamped with `buffered_at` (the
/// buffer clock, Unix-like milliseconds). Returns how many points were encoded.
pub fn encode<'a>(
    dict: &mut Dict,
    points: impl Iterator<Item = &'a Point>,
    buffered_at: i64,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    let mut body = Vec::with_capacity(256);
    let mut count = 0u64;
    let mut base = None;
    let mut prev = 0i64;
    for p in points {
        let base_ts = *base.get_or_insert(p.ts);
        if count == 0 {
            prev = base_ts;
        }
        count += 1;
        put_varint(&mut body, u64::from(dict.id_of(&p.key)));
        put_varint(&mut body, zigzag(p.ts.wrapping_sub(prev)));
        prev = p.ts;
        let bad = if p.quality == Quality::Bad { BAD } else { 0 };
        if let Some(payload) = &p.payload {
            body.push(MESSAGE | bad);
            put_bytes(&mut body, payload);
        } else {
            match p.value {
                None => body.push(NONE | bad),
                Some(Value::String(ref t)) => {
                    body.push(TEXT | bad);
                    put_bytes(&mut body, t.as_bytes());
                }
                Some(Value::Bool(b)) => body.push(if b { TRUE } else { FALSE } | bad),
                Some(Value::Int(i)) => {
                    body.push(INT | bad);
                    put_varint(&mut body, zigzag(i));
                }
                Some(Value::UInt(u)) => {
                    body.push(UINT | bad);
                    put_varint(&mut body, u);
                }
                Some(Value::F32(f)) => {
                    body.push(F32 | bad);
                    body.extend_from_slice(&f.to_le_bytes());
                }
                Some(Value::Float(f)) => match as_decimal(f) {
                    Some((k, m)) => {
                        body.push(DECIMAL | (k << 4) | bad);
                        put_varint(&mut body, zigzag(m));
                    }
                    None => {
                        body.push(F64 | bad);
                        body.extend_from_slice(&f.to_le_bytes());
                    }
                },
            }
        }
        if bad != 0 {
            put_bytes(&mut body, p.error.as_deref().unwrap_or("").as_bytes());
        }
    }
    put_varint(out, count);
    put_varint(out, zigzag(base.unwrap_or(0)));
    out.extend_from_slice(&body);
    put_varint(out, zigzag(buffered_at.wrapping_sub(base.unwrap_or(0))));
    count as usize
}

/// A point read back from the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub id: u32,
    pub ts: i64,
    pub quality: Quality,
    pub value: Option<Value>,
    pub error: Option<String>,
    pub payload: Option<Vec<u8>>,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (first, rest) = self.b.split_first()?;
        self.b = rest;
        Some(*first)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.varint()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
}

/// The number of points in a record, read from its first bytes.
pub fn count(record: &[u8]) -> u64 {
    Reader { b: record }.varint().unwrap_or(0)
}

/// Decodes a record's points. `None` means the record is malformed (a checksum-valid record
/// written by another version); the caller counts it and skips it.
pub fn decode(record: &[u8]) -> Option<Vec<Decoded>> {
    decode_record(record).map(|(points, _)| points)
}

/// Decodes a record: its points, and when it was buffered (`None` for records from before that
/// was stamped).
pub fn decode_record(record: &[u8]) -> Option<(Vec<Decoded>, Option<i64>)> {
    let mut r = Reader { b: record };
    let count = r.varint()?;
    let base = unzigzag(r.varint()?);
    let mut prev = base;
    let mut out = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let id = u32::try_from(r.varint()?).ok()?;
        let ts = prev.wrapping_add(unzigzag(r.varint()?));
        prev = ts;
        let kind = r.byte()?;
        let quality = if kind & BAD != 0 { Quality::Bad } else { Quality::Good };
        let mut payload = None;
        let value = match kind & 0x0f {
            NONE => None,
            FALSE => Some(Value::Bool(false)),
            TRUE => Some(Value::Bool(true)),
            INT => Some(Value::Int(unzigzag(r.varint()?))),
            UINT => Some(Value::UInt(r.varint()?)),
            F32 => Some(Value::F32(f32::from_le_bytes(r.take(4)?.try_into().ok()?))),
            F64 => Some(Value::Float(f64::from_le_bytes(r.take(8)?.try_into().ok()?))),
            DECIMAL => {
                let k = usize::from((kind >> 4) & 0x07);
                Some(Value::Float(unzigzag(r.varint()?) as f64 / POW10[k]))
            }
            MESSAGE => {
                payload = Some(r.bytes()?);
                None
            }
            TEXT => Some(Value::String(String::from_utf8(r.bytes()?).ok()?.into())),
            _ => return None,
        };
        let error = if quality == Quality::Bad {
            Some(String::from_utf8_lossy(&r.bytes()?).into_owned()).filter(|e| !e.is_empty())
        } else {
            None
        };
        out.push(Decoded { id, ts, quality, value, error, payload });
    }
    let buffered_at = if r.b.is_empty() { None } else { Some(base.wrapping_add(unzigzag(r.varint()?))) };
    Some((out, buffered_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::Registry;

    fn tmp(name: &str) -> PathBuf {
        crate::sinks::scratch_dir(&format!("codec-{name}"))
    }

    #[test]
    fn every_kind_of_point_round_trips() {
        let d = tmp("rt");
        let mut dict = Dict::open(&d).unwrap();
        let r = Registry::default();
        let k = r.intern("boiler-1", "temperature");
        let m = r.intern_at("boiler-1", "tb", "updraft/derived/boiler-1/tb", true);
        let points = vec![
            Point::good(k.clone(), Value::Float(21.7), 1_732_860_000_123),
            Point::good(k.clone(), Value::Float(std::f64::consts::PI), 1_732_860_000_123),
            Point::good(k.clone(), Value::Float(-0.0), 1_732_860_000_100),
            Point::good(k.clone(), Value::F32(0.1), 1_732_860_000_200),
            Point::good(k.clone(), Value::Int(-5), 1),
            Point::good(k.clone(), Value::UInt(u64::MAX), 2),
            Point::good(k.clone(), Value::Bool(true), 3),
            Point::good(k.clone(), Value::String("Recipe 7 — 蓝色".into()), 4),
            Point::good(k.clone(), Value::String("".into()), 5),
            Point::bad(k.clone(), "timeout after 1s".into(), 4),
            Point::message(m, bytes::Bytes::from_static(b"{\"raw\":1}"), 5),
        ];
        let mut out = Vec::new();
        assert_eq!(encode(&mut dict, points.iter(), 1_732_860_000_500, &mut out), points.len());
        assert_eq!(count(&out), points.len() as u64);
        let (back, buffered_at) = decode_record(&out).unwrap();
        assert_eq!(buffered_at, Some(1_732_860_000_500), "the buffer time rides along");
        for (p, d) in points.iter().zip(&back) {
            assert_eq!(d.ts, p.ts);
            assert_eq!(d.quality, p.quality);
            assert_eq!(d.error.as_deref(), p.error.as_deref());
            assert_eq!(d.payload.as_deref(), p.payload.as_deref());
            match (&d.value, &p.value) {
                (Some(Value::Float(a)), Some(Value::Float(b))) => assert_eq!(a.to_bits(), b.to_bits()),
                (a, b) => assert_eq!(a, b),
            }
        }
        let entries = dict.entries();
        let entries = entries.read().unwrap();
        assert_eq!(&*entries[back[0].id as usize].tag, "temperature");
        assert_eq!(&*entries[back[10].id as usize].topic, "updraft/derived/boiler-1/tb");
    }

    #[test]
    fn records_from_before_the_buffer_time_still_decode() {
        let d = tmp("old");
        let mut dict = Dict::open(&d).unwrap();
        let r = Registry::default();
        let p = [Point::good(r.intern("d", "t"), Value::Int(7), 1_000)];
        let mut out = Vec::new();
        encode(&mut dict, p.iter(), 1_010, &mut out);
        // The previous format ended after the points: without the last byte here.
        out.pop();
        let (back, buffered_at) = decode_record(&out).unwrap();
        assert_eq!((back.len(), back[0].value.clone(), buffered_at), (1, Some(Value::Int(7)), None));
    }

    #[test]
    fn a_typical_reading_costs_few_bytes() {
        let d = tmp("size");
        let mut dict = Dict::open(&d).unwrap();
        let r = Registry::default();
        let keys: Vec<_> = (0..100).map(|i| r.intern("press-7", &format!("t{i}"))).collect();
        let points: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Point::good(k.clone(), Value::Float(200.0 + i as f64 * 0.1), 1_732_860_000_000))
            .collect();
        let mut out = Vec::new();
        encode(&mut dict, points.iter(), 1_732_860_000_040, &mut out);
        // id 1 + ts delta 1 + kind 1 + mantissa 2-3 bytes.
        assert!(out.len() <= 100 * 7, "{} bytes for 100 points", out.len());
    }

    #[test]
    fn the_dictionary_survives_a_restart_and_a_torn_line() {
        let d = tmp("dict");
        let r = Registry::default();
        let mut dict = Dict::open(&d).unwrap();
        let a = dict.id_of(&r.intern("d", "a"));
        let b = dict.id_of(&r.intern("d", "b"));
        dict.persist().unwrap();
        drop(dict);
        let mut f = OpenOptions::new().append(true).open(d.join("tags.jsonl")).unwrap();
        f.write_all(b"[2,\"d\",\"c").unwrap();
        drop(f);
        let mut dict = Dict::open(&d).unwrap();
        // A fresh process interns in another order; ids stay those on disk.
        let r2 = Registry::default();
        assert_eq!(dict.id_of(&r2.intern("d", "b")), b);
        assert_eq!(dict.id_of(&r2.intern("d", "a")), a);
        assert_eq!(dict.id_of(&r2.intern("d", "c")), 2);
        dict.persist().unwrap();
        assert_eq!(Dict::open(&d).unwrap().entries().read().unwrap().len(), 3);
    }

    #[test]
    fn garbage_never_panics() {
        for seed in 0..2000u64 {
            fastrand::seed(seed);
            let len = fastrand::usize(0..64);
            let junk: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
            let _ = decode(&junk);
        }
    }
}
