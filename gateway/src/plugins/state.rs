//! The journal that makes a plugin's state survive restarts exactly once:
//! `{data_dir}/plugin-state/{plugin}.journal`, an append-only file of checksummed records.
//!
//! After a call that staged state, the runner appends a **commit** (the state and the call's
//! outputs), hands the outputs to the hub, then appends **delivered**. At start the last commit's
//! state is what the new instance loads, and a commit without its delivered mark has its outputs
//! handed to the hub again. So a kill between the commit and the hand-over loses nothing; only a
//! kill in the instant between the hand-over (one channel send) and the mark can repeat the
//! outputs of that one call. Records are `[len u32 LE][crc32 u32 LE][payload]`; a torn tail (a
//! power cut in the middle of a write) fails its checksum and is cut. The file is compacted to
//! the latest state when it passes [`COMPACT_AT`]. Appends are plain writes (safe against a crash
//! of the process); the file is synced at most every [`SYNC_EVERY`], like the cloud buffer.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::host::{Emit, Emits, Message, WitQuality, WitValue};

/// Size past which the journal is rewritten with only the latest state.
pub const COMPACT_AT: u64 = 1 << 20;
/// Most time between syncs of the journal to the disk.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);

const COMMIT: u8 = 1;
const DELIVERED: u8 = 2;

/// What a journal held when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The state of the last commit.
    pub state: Option<Vec<u8>>,
    /// The last commit's number.
    pub seq: u64,
    /// Its outputs, if they were never marked as handed to the hub.
    pub undelivered: Option<Emits>,
    /// Bytes of a torn tail that were cut.
    pub cut: u64,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
    last_sync: Instant,
}

impl Journal {
    /// Opens (or creates) the journal of `plugin` in `dir` and reads what it holds.
    pub fn open(dir: &Path, plugin: &str) -> std::io::Result<(Journal, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{plugin}.journal"));
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut rec = Recovered::default();
        let mut at = 0usize;
        let mut pending: Option<(u64, Emits)> = None;
        while let Some((payload, next)) = record(&bytes, at) {
            match decode(payload) {
                Some(Entry::Commit { seq, state, emits }) => {
                    rec.state = Some(state);
                    rec.seq = seq;
                    pending = Some((seq, emits));
                }
                Some(Entry::Delivered { seq }) => {
                    if pending.as_ref().is_some_and(|(s, _)| *s == seq) {
                        pending = None;
                    }
                }
                None => break,
            }
            at = next;
        }
        if at < bytes.len() {
            rec.cut = (bytes.len() - at) as u64;
            file.set_len(at as u64)?;
            file.seek(SeekFrom::End(0))?;
        }
        rec.undelivered = pending.map(|(_, e)| e).filter(|e| !e.points.is_empty() || !e.messages.is_empty());
        Ok((Journal { path, file, len: at as u64, last_sync: Instant::now() }, rec))
    }

    /// Records `state` and the outputs of call `seq`, before they are handed to the hub.
    pub fn commit(&mut self, seq: u64, state: &[u8], emits: &Emits) -> std::io::Result<()> {
        let saved = SavedEmits::from(emits);
        let json = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        let mut payload = Vec::with_capacity(1 + 8 + 4 + state.len() + json.len());
        payload.push(COMMIT);
        payload.extend_from_slice(&seq.to_le_bytes());
        payload.extend_from_slice(&(state.len() as u32).to_le_bytes());
        payload.extend_from_slice(state);
        payload.extend_from_slice(&json);
        self.append(&payload)
    }

    /// Marks call `seq`'s outputs as handed to the hub; compacts a long journal.
    pub fn delivered(&mut self, seq: u64, state: &[u8]) -> std::io::Result<()> {
        let mut payload = vec![DELIVERED];
        payload.extend_from_slice(&seq.to_le_bytes());
        self.append(&payload)?;
        if self.len > COMPACT_AT {
            self.compact(seq, state)?;
        }
        Ok(())
    }

    fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(8 + payload.len());
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        rec.extend_from_slice(payload);
        self.file.write_all(&rec)?;
        self.len += rec.len() as u64;
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.file.sync_data()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    /// Rewrites the journal as one commit of `state` with no outputs (nothing left to hand over).
    fn compact(&mut self, seq: u64, state: &[u8]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut fresh = Journal {
            path: tmp.clone(),
            file: OpenOptions::new().read(true).append(true).create_new(true).open(&tmp)?,
            len: 0,
            last_sync: Instant::now(),
        };
        fresh.commit(seq, state, &Emits { points: Vec::new(), messages: Vec::new() })?;
        fresh.file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = fresh.file;
        self.len = fresh.len;
        Ok(())
    }
}

/// The next record's payload at `at` and where the one after starts, if it is whole and intact.
fn record(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let head = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    let payload = bytes.get(at + 8..at + 8 + len)?;
    (crc32fast::hash(payload) == crc).then_some((payload, at + 8 + len))
}

enum Entry {
    Commit { seq: u64, state: Vec<u8>, emits: Emits },
    Delivered { seq: u64 },
}

fn decode(p: &[u8]) -> Option<Entry> {
    let (&kind, rest) = p.split_first()?;
    let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    match kind {
        COMMIT => {
            let n = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
            let state = rest.get(12..12 + n)?.to_vec();
            let saved: SavedEmits = serde_json::from_slice(rest.get(12 + n..)?).ok()?;
            Some(Entry::Commit { seq, state, emits: saved.into() })
        }
        DELIVERED => Some(Entry::Delivered { seq }),
        _ => None,
    }
}

/// A call's outputs as the journal stores them (the WIT types have no serde).
#[derive(Serialize, Deserialize)]
struct SavedEmits {
    points: Vec<SavedEmit>,
    messages: Vec<(String, String, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct SavedEmit {
    output: String,
    device: String,
    tag: String,
    value: Option<SavedValue>,
    good: bool,
    ts: i64,
}

#[derive(Serialize, Deserialize)]
enum SavedValue {
    B(bool),
    I(i64),
    U(u64),
    F(f64),
    T(String),
}

impl From<&Emits> for SavedEmits {
    fn from(e: &Emits) -> Self {
        let points = e
            .points
            .iter()
            .map(|p| SavedEmit {
                output: p.output.clone(),
                device: p.device.clone(),
                tag: p.tag.clone(),
                value: p.value.as_ref().map(|v| match v {
                    WitValue::Boolean(b) => SavedValue::B(*b),
                    WitValue::Int(i) => SavedValue::I(*i),
                    WitValue::Uint(u) => SavedValue::U(*u),
                    WitValue::Float(f) => SavedValue::F(*f),
                    WitValue::Text(t) => SavedValue::T(t.clone()),
                }),
                good: p.quality == WitQuality::Good,
                ts: p.ts,
            })
            .collect();
        let messages = e.messages.iter().map(|m| (m.output.clone(), m.subject.clone(), m.payload.clone())).collect();
        SavedEmits { points, messages }
    }
}

impl From<SavedEmits> for Emits {
    fn from(s: SavedEmits) -> Self {
        let points = s
            .points
            .into_iter()
            .map(|p| Emit {
                output: p.output,
                device: p.device,
                tag: p.tag,
                value: p.value.map(|v| match v {
                    SavedValue::B(b) => WitValue::Boolean(b),
                    SavedValue::I(i) => WitValue::Int(i),
                    SavedValue::U(u) => WitValue::Uint(u),
                    SavedValue::F(f) => WitValue::Float(f),
                    SavedValue::T(t) => WitValue::Text(t),
                }),
                quality: if p.good { WitQuality::Good } else { WitQuality::Bad },
                ts: p.ts,
            })
            .collect();
        let messages =
            s.messages.into_iter().map(|(output, subject, payload)| Message { output, subject, payload }).collect();
        Emits { points, messages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(v: f64) -> Emits {
        Emits {
            points: vec![Emit {
                output: "default".into(),
                device: "d".into(),
                tag: "total".into(),
                value: Some(WitValue::Float(v)),
                quality: WitQuality::Good,
                ts: 7,
            }],
            messages: Vec::new(),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("updraft-journal-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_last_commit_is_recovered_and_undelivered_outputs_come_back() {
        let d = dir("recover");
        let (mut j, rec) = Journal::open(&d, "p").unwrap();
        assert!(rec.state.is_none() && rec.undelivered.is_none());
        j.commit(1, b"one", &emit(1.0)).unwrap();
        j.delivered(1, b"one").unwrap();
        j.commit(2, b"two", &emit(2.0)).unwrap();
        drop(j);
        let (mut j, rec) = Journal::open(&d, "p").unwrap();
        assert_eq!((rec.state.as_deref(), rec.seq), (Some(&b"two"[..]), 2));
        let again = rec.undelivered.expect("call 2 was never marked delivered");
        assert!(matches!(again.points[0].value, Some(WitValue::Float(v)) if v == 2.0));
        j.delivered(2, b"two").unwrap();
        drop(j);
        let (_, rec) = Journal::open(&d, "p").unwrap();
        assert!(rec.undelivered.is_none(), "delivered once, never again");
        assert_eq!(rec.state.as_deref(), Some(&b"two"[..]));
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_record_before_it_stands() {
        let d = dir("torn");
        let (mut j, _) = Journal::open(&d, "p").unwrap();
        j.commit(1, b"one", &emit(1.0)).unwrap();
        j.delivered(1, b"one").unwrap();
        j.commit(2, b"two", &emit(2.0)).unwrap();
        drop(j);
        let path = d.join("p.journal");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (_, rec) = Journal::open(&d, "p").unwrap();
        assert_eq!(rec.state.as_deref(), Some(&b"one"[..]));
        assert!(rec.undelivered.is_none());
        assert!(rec.cut > 0);
    }

    #[test]
    fn a_long_journal_is_compacted_to_its_latest_state() {
        let d = dir("compact");
        let (mut j, _) = Journal::open(&d, "p").unwrap();
        let big = vec![7u8; 60_000];
        for seq in 1..=40 {
            j.commit(seq, &big, &emit(seq as f64)).unwrap();
            j.delivered(seq, &big).unwrap();
        }
        assert!(std::fs::metadata(d.join("p.journal")).unwrap().len() < COMPACT_AT);
        drop(j);
        let (_, rec) = Journal::open(&d, "p").unwrap();
        assert_eq!((rec.seq, rec.state.map(|s| s.len())), (40, Some(60_000)));
        assert!(rec.undelivered.is_none());
    }
}
