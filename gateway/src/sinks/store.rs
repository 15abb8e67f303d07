//! The disk store behind store-and-forward: an append-only log of checksummed records in segment
//! files, with a durable acknowledged position. Records are deleted (whole segments at a time) only
//! once acknowledged; a torn tail from a power cut is detected by its checksum, cut and counted.
//!
//! Layout in its directory: `{base:020}.seg` segment files, where `base` is the logical offset of
//! the segment's first byte, and `ack`, the acknowledged offset (8 bytes LE + CRC-32, replaced
//! atomically). A record is `[len u32 LE][crc32 u32 LE][payload]`; its offset is logical and never
//! reused, so an offset identifies a record across restarts.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const HEADER: u64 = 8;
/// Bytes a record takes on disk besides its payload (length and checksum).
pub const FRAME_OVERHEAD: u64 = HEADER;
/// Largest record accepted; anything longer on disk is corruption.
pub const MAX_RECORD: usize = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Cap on unacknowledged bytes; past it the oldest segment is dropped (drop-oldest).
    pub max_bytes: u64,
    /// What a record is worth in the counts (`pending`, `dropped`): the sink counts points.
    pub weigh: fn(&[u8]) -> u64,
}

/// Counts records, for stores that do not weigh them.
pub fn one(_: &[u8]) -> u64 {
    1
}

/// What `open` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Bytes cut from the end of the last segment because they did not form a valid record.
    pub truncated_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    len: u64,
    path: PathBuf,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    opts: StoreOptions,
    segments: VecDeque<Segment>,
    writer: File,
    acked: u64,
    /// The acknowledged offset last written to the `ack` file; behind `acked` while that write
    /// fails (a full disk), and retried by every `ack` call.
    durable_acked: u64,
    /// Records dropped because the cap was reached, since open, weighed by `StoreOptions::weigh`.
    pub dropped: u64,
    /// Everything before this offset has been accounted for, as delivered (by the reader) or as
    /// dropped (here): each record is counted by whichever side moves this past it first, so a
    /// record dropped at the cap while in flight is not also counted as delivered.
    counted_to: Arc<AtomicU64>,
    /// Records that failed their checksum inside a sealed segment, weighed, and the offset up to
    /// which they were counted (a re-read after a rewind must not count them twice).
    corrupt: AtomicU64,
    corrupt_seen_to: AtomicU64,
}

fn seg_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// Why `scan` stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// The end, or the visitor asked to stop.
    Done,
    /// A record whose frame is whole but whose checksum fails: `(its offset, its length)`, so a
    /// reader can count it and go on after it.
    BadChecksum(u64, u64, Vec<u8>),
    /// A header that cannot be a record (zero, oversized, or running past the end).
    BadHeader,
}

/// Reads valid records of a segment from `from` (a position inside it); stops at the first
/// invalid or incomplete record and returns the position where valid data ends, and why.
fn scan(path: &Path, from: u64, visit: impl FnMut(u64, Vec<u8>) -> bool) -> io::Result<u64> {
    scan_until(path, from, u64::MAX, visit).map(|(pos, _)| pos)
}

fn scan_until(
    path: &Path,
    from: u64,
    limit: u64,
    mut visit: impl FnMut(u64, Vec<u8>) -> bool,
) -> io::Result<(u64, Stop)> {
    let mut f = io::BufReader::with_capacity(64 << 10, File::open(path)?);
    let len = f.get_ref().metadata()?.len().min(limit);
    let mut pos = from;
    f.seek(SeekFrom::Start(pos))?;
    let mut header = [0u8; HEADER as usize];
    while pos + HEADER <= len {
        f.read_exact(&mut header)?;
        let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        // An empty record is never written: a zero header is a zero-filled page from a power cut.
        if n == 0 || n as usize > MAX_RECORD || pos + HEADER + n > len {
            return Ok((pos, Stop::BadHeader));
        }
        let mut payload = vec![0u8; n as usize];
        f.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            return Ok((pos, Stop::BadChecksum(pos, HEADER + n, payload)));
        }
        let at = pos;
        pos += HEADER + n;
        if !visit(at, payload) {
            break;
        }
    }
    Ok((pos, Stop::Done))
}

impl Store {
    pub fn open(dir: &Path, opts: StoreOptions) -> io::Result<(Store, OpenReport)> {
        fs::create_dir_all(dir)?;
        let mut bases: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        bases.sort_unstable();
        let acked = read_ack(dir)?;
        let mut report = OpenReport::default();
        let mut segments = VecDeque::new();
        for (i, base) in bases.iter().enumerate() {
            let path = seg_path(dir, *base);
            let file_len = fs::metadata(&path)?.len();
            let last = i + 1 == bases.len();
            // Sealed segments were complete when sealed; only the last one can have a torn tail.
            let len = if last {
                let valid = scan(&path, 0, |_, _| true)?;
                if valid < file_len {
                    report.truncated_bytes = file_len - valid;
                    OpenOptions::new().write(true).open(&path)?.set_len(valid)?;
                }
                valid
            } else {
                file_len
            };
            if base + len <= acked && !last {
                fs::remove_file(&path)?;
                continue;
            }
            segments.push_back(Segment { base: *base, len, path });
        }
        if segments.is_empty() {
            let base = acked;
            segments.push_back(Segment { base, len: 0, path: seg_path(dir, base) });
        }
        // Delivered segments are deleted before the acknowledgement is written (a full disk needs
        // the space first), so a crash in between leaves an `ack` behind the first segment.
        let acked = acked.max(segments.front().map_or(0, |s| s.base));
        let tail = segments.back().expect("one segment exists");
        let writer = OpenOptions::new().create(true).append(true).open(&tail.path)?;
        // Only the last segment was read: opening a full buffer must not delay start-up. What is
        // pending is weighed separately (`pending_weight`), off the start-up path.
        let store = Store {
            dir: dir.to_owned(),
            opts,
            segments,
            writer,
            acked,
            durable_acked: acked,
            dropped: 0,
            counted_to: Arc::new(AtomicU64::new(acked)),
            corrupt: AtomicU64::new(0),
            corrupt_seen_to: AtomicU64::new(acked),
        };
        Ok((store, report))
    }

    /// Appends one record and returns its offset. Not durable until `sync`.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        if payload.len() > MAX_RECORD || payload.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a record holds 1 byte to 16 MiB"));
        }
        if self.tail().len >= self.opts.segment_bytes {
            self.roll()?;
        }
        let mut frame = Vec::with_capacity(payload.len() + HEADER as usize);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        if let Err(e) = self.writer.write_all(&frame) {
            // Disk full or an I/O error: cut what part of the frame was written, so the next append
            // does not land behind garbage (which a later open would cut, with every record after it).
            let _ = self.writer.set_len(self.tail().len);
            return Err(e);
        }
        let tail = self.segments.back_mut().expect("one segment exists");
        let at = tail.base + tail.len;
        tail.len += frame.len() as u64;
        self.enforce_cap()?;
        Ok(at)
    }

    /// Makes every appended record durable (one fdatasync: call it per batch or on an interval).
    pub fn sync(&mut self) -> io::Result<()> {
        durable(&self.writer)
    }

    /// A second handle on the segment being written, to make it durable without holding the
    /// store: an fdatasync can take seconds on a slow disk, and the reader must not wait for it.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.writer.try_clone()
    }

    /// Up to `max` records from `offset` on, with their offsets. A record that fails its checksum
    /// (the disk corrupted it after it was written) is skipped and counted (`take_corrupt`); if its
    /// header is unusable too, the rest of its segment is, as one record.
    pub fn read_from(&self, offset: u64, max: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for s in &self.segments {
            if out.len() >= max {
                break;
            }
            if s.base + s.len <= offset || s.len == 0 {
                continue;
            }
            let mut from = offset.saturating_sub(s.base);
            // Only the part of the segment the store knows of: nothing past its recorded length.
            loop {
                let (pos, stop) = scan_until(&s.path, from, s.len, |at, payload| {
                    out.push((s.base + at, payload));
                    out.len() < max
                })?;
                match stop {
                    Stop::Done => break,
                    Stop::BadChecksum(at, len, payload) => {
                        self.count_corrupt(s.base + at, (self.opts.weigh)(&payload).clamp(1, 65_536));
                        from = at + len;
                    }
                    Stop::BadHeader => {
                        self.count_corrupt(s.base + pos, 1);
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn count_corrupt(&self, at: u64, weight: u64) {
        if self.corrupt_seen_to.fetch_max(at + 1, Ordering::AcqRel) <= at {
            self.corrupt.fetch_add(weight, Ordering::AcqRel);
            tracing::warn!(dir = %self.dir.display(), offset = at, "A buffer record failed its checksum (disk corruption); skipped and counted as corrupt.");
        }
    }

    /// Corrupt records found since the last call, weighed.
    pub fn take_corrupt(&self) -> u64 {
        self.corrupt.swap(0, Ordering::AcqRel)
    }

    /// The accounting position shared with the reader (see `counted_to`).
    pub fn counted(&self) -> Arc<AtomicU64> {
        self.counted_to.clone()
    }

    /// A snapshot of the unacknowledged part: each segment's path, the position to start at in it,
    /// and its length. Weigh it with `pending_weight` without holding the store.
    pub fn pending_segments(&self) -> Vec<(PathBuf, u64, u64)> {
        self.segments
            .iter()
            .filter(|s| s.base + s.len > self.acked && s.len > 0)
            .map(|s| (s.path.clone(), self.acked.saturating_sub(s.base), s.len))
            .collect()
    }

    /// The offset just past the last record.
    pub fn end(&self) -> u64 {
        let t = self.tail();
        t.base + t.len
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Unacknowledged bytes on disk.
    pub fn pending_bytes(&self) -> u64 {
        self.end().saturating_sub(self.acked)
    }

    /// Records everything before `upto` as delivered, durably, and deletes segments that hold
    /// nothing else. The segments go first: on a full disk the acknowledgement file needs the
    /// space they free, and delivered data must never pin the disk. A failed write of the
    /// acknowledgement is retried by the next call (a restart meanwhile only means resending).
    pub fn ack(&mut self, upto: u64) -> io::Result<()> {
        if upto > self.acked {
            self.acked = upto.min(self.end());
        }
        while self.segments.len() > 1 && self.segments[0].base + self.segments[0].len <= self.acked {
            fs::remove_file(&self.segments[0].path)?;
            self.segments.pop_front();
        }
        if self.durable_acked < self.acked {
            write_ack(&self.dir, self.acked)?;
            self.durable_acked = self.acked;
        }
        Ok(())
    }

    /// Whether the acknowledged position still has to be written out.
    pub fn ack_pending(&self) -> bool {
        self.durable_acked < self.acked
    }

    fn tail(&self) -> &Segment {
        self.segments.back().expect("one segment exists")
    }

    fn roll(&mut self) -> io::Result<()> {
        durable(&self.writer)?;
        let base = self.end();
        let path = seg_path(&self.dir, base);
        self.writer = OpenOptions::new().create(true).append(true).open(&path)?;
        self.segments.push_back(Segment { base, len: 0, path });
        Ok(())
    }

    /// Drop-oldest: while over the cap, delete the oldest sealed segment and count its records.
    fn enforce_cap(&mut self) -> io::Result<()> {
        while self.pending_bytes() > self.opts.max_bytes && self.segments.len() > 1 {
            self.drop_front()?;
        }
        Ok(())
    }

    /// Drop-oldest when the disk, not the cap, is full: drops the oldest segment (sealing the one
    /// being written first if it is the only one) and counts its records. False if nothing is left
    /// to drop.
    pub fn drop_oldest(&mut self) -> io::Result<bool> {
        if self.segments.len() <= 1 {
            if self.tail().len == 0 {
                return Ok(false);
            }
            self.roll()?;
        }
        self.drop_front()?;
        Ok(true)
    }

    fn drop_front(&mut self) -> io::Result<()> {
        let s = self.segments.pop_front().expect("callers keep one segment");
        // Claim the segment for the dropped count; records the reader already counted as
        // delivered (acknowledged meanwhile) are not counted again.
        let counted = self.counted_to.fetch_max(s.base + s.len, Ordering::AcqRel);
        let from = self.acked.max(counted).saturating_sub(s.base);
        let mut n = 0u64;
        let weigh = self.opts.weigh;
        scan_until(&s.path, from, s.len, |_, r| {
            n += weigh(&r);
            true
        })?;
        self.dropped += n;
        // Delete first: on a full disk the acknowledgement file needs the space this frees.
        fs::remove_file(&s.path)?;
        self.acked = self.acked.max(s.base + s.len);
        write_ack(&self.dir, self.acked)?;
        self.durable_acked = self.acked;
        Ok(())
    }
}

/// Weighs the records of a `pending_segments` snapshot. A segment deleted meanwhile (delivered or
/// dropped at the cap) simply counts for nothing.
pub fn pending_weight(segments: &[(PathBuf, u64, u64)], weigh: fn(&[u8]) -> u64) -> u64 {
    let mut total = 0;
    for (path, from, len) in segments {
        let _ = scan(path, *from, |at, r| {
            if at >= *len {
                return false;
            }
            total += weigh(&r);
            true
        });
    }
    total
}

fn read_ack(dir: &Path) -> io::Result<u64> {
    match fs::read(dir.join("ack")) {
        Ok(b) if b.len() == 12 => {
            let v = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
            let crc = u32::from_le_bytes(b[8..].try_into().unwrap_or([0; 4]));
            // A damaged ack file only means re-sending: at-least-once, never loss.
            Ok(if crc32fast::hash(&b[..8]) == crc { v } else { 0 })
        }
        Ok(_) => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// fdatasync, plus the test hook `UPDRAFT_TEST_FSYNC_DELAY_MS`: a disk that takes that long per
/// sync, to show that a stalling disk delays nothing but the sink (nothing sets it in production).
pub fn durable(f: &File) -> io::Result<()> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("UPDRAFT_TEST_FSYNC_DELAY_MS").ok()?.parse().ok().map(std::time::Duration::from_millis)
    });
    if let Some(d) = delay {
        std::thread::sleep(*d);
    }
    f.sync_data()
}

fn write_ack(dir: &Path, v: u64) -> io::Result<()> {
    let mut b = v.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32fast::hash(&v.to_le_bytes()).to_le_bytes());
    let tmp = dir.join("ack.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&b)?;
    durable(&f)?;
    fs::rename(&tmp, dir.join("ack"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        crate::sinks::scratch_dir(&format!("store-{name}"))
    }

    const OPTS: StoreOptions = StoreOptions { segment_bytes: 64, max_bytes: 1 << 20, weigh: one };

    #[test]
    fn records_survive_reopen_in_order_across_segments() {
        let d = dir("order");
        let (mut s, _) = Store::open(&d, OPTS).unwrap();
        let offsets: Vec<u64> = (0..20).map(|i| s.append(format!("record-{i}").as_bytes()).unwrap()).collect();
        s.sync().unwrap();
        assert!(s.segments.len() > 2, "small segments roll over");
        drop(s);
        let (s, report) = Store::open(&d, OPTS).unwrap();
        assert_eq!(report, OpenReport { truncated_bytes: 0 });
        assert_eq!(pending_weight(&s.pending_segments(), one), 20);
        let got = s.read_from(0, usize::MAX).unwrap();
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), offsets);
        assert_eq!(got[7].1, b"record-7");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn acked_records_are_gone_after_reopen_and_segments_deleted() {
        let d = dir("ack");
        let (mut s, _) = Store::open(&d, OPTS).unwrap();
        let offsets: Vec<u64> = (0..20).map(|i| s.append(format!("r{i:02}").as_bytes()).unwrap()).collect();
        let files_before = fs::read_dir(&d).unwrap().count();
        s.ack(offsets[15]).unwrap();
        assert!(fs::read_dir(&d).unwrap().count() < files_before, "fully acked segments are deleted");
        drop(s);
        let (s, _) = Store::open(&d, OPTS).unwrap();
        assert_eq!(pending_weight(&s.pending_segments(), one), 5);
        let got = s.read_from(s.acked(), usize::MAX).unwrap();
        assert_eq!(got.first().map(|(_, p)| p.clone()), Some(b"r15".to_vec()));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_is_cut_and_counted_and_appending_continues() {
        let d = dir("torn");
        let (mut s, _) =
            Store::open(&d, StoreOptions { segment_bytes: 1 << 20, max_bytes: 1 << 30, weigh: one }).unwrap();
        for i in 0..5 {
            s.append(format!("ok-{i}").as_bytes()).unwrap();
        }
        s.sync().unwrap();
        let tail = s.tail().path.clone();
        drop(s);
        // A power cut mid-write: half a header, then a frame whose checksum is wrong.
        let mut f = OpenOptions::new().append(true).open(&tail).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2, 3, 4, b'g', b'a', b'r', b'b', b'a', b'g', b'e']).unwrap();
        drop(f);
        let (mut s, report) = Store::open(&d, OPTS).unwrap();
        assert_eq!(report.truncated_bytes, 15);
        assert_eq!(pending_weight(&s.pending_segments(), one), 5);
        s.append(b"after").unwrap();
        let got = s.read_from(0, usize::MAX).unwrap();
        assert_eq!(got.len(), 6);
        assert_eq!(got[5].1, b"after");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_power_cut_anywhere_keeps_every_whole_record_before_it() {
        // Unsynced pages lost in a power cut leave the file cut at any byte, or with zeroed pages.
        let d = dir("powercut");
        let big = StoreOptions { segment_bytes: 1 << 20, max_bytes: 1 << 30, weigh: one };
        let (mut s, _) = Store::open(&d, big).unwrap();
        let ends: Vec<u64> =
            (0..50).map(|i| s.append(format!("record-{i:02}-{}", "x".repeat(i)).as_bytes()).unwrap()).collect();
        s.sync().unwrap();
        let seg = s.tail().path.clone();
        let full = fs::read(&seg).unwrap();
        drop(s);
        // Every record boundary, then random places.
        let cuts: Vec<usize> =
            ends.iter().map(|e| *e as usize).chain((0..200).map(|_| fastrand::usize(0..=full.len()))).collect();
        for cut in cuts {
            let mut damaged = full[..cut].to_vec();
            if fastrand::bool() {
                // A zero-filled page after the cut, as a file system may leave.
                damaged.extend(std::iter::repeat_n(0u8, fastrand::usize(1..4096)));
            }
            fs::write(&seg, &damaged).unwrap();
            let (s, report) = Store::open(&d, big).unwrap();
            let whole = ends.iter().filter(|&&at| at < cut as u64).filter(|&&at| {
                let i = ends.iter().position(|e| *e == at).unwrap();
                let next = ends.get(i + 1).copied().unwrap_or(full.len() as u64);
                next <= cut as u64
            });
            let expect = whole.count();
            let got = s.read_from(0, usize::MAX).unwrap();
            assert_eq!(got.len(), expect, "cut at {cut}");
            assert!(got.iter().enumerate().all(|(i, (_, r))| r.starts_with(format!("record-{i:02}").as_bytes())));
            assert_eq!(report.truncated_bytes, damaged.len() as u64 - s.end(), "cut at {cut}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn over_the_cap_the_oldest_records_are_dropped_and_counted() {
        let d = dir("cap");
        let (mut s, _) = Store::open(&d, StoreOptions { segment_bytes: 100, max_bytes: 300, weigh: one }).unwrap();
        for i in 0..100 {
            s.append(format!("point-{i:03}").as_bytes()).unwrap();
        }
        assert!(s.pending_bytes() <= 300 + 100, "pending {}", s.pending_bytes());
        let left = s.read_from(s.acked(), usize::MAX).unwrap();
        assert_eq!(s.dropped + left.len() as u64, 100, "every record is either kept or counted");
        assert_eq!(left.last().unwrap().1, b"point-099", "the newest survive");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn delivered_segments_are_freed_even_when_the_ack_file_cannot_be_written() {
        let d = dir("ackfail");
        let (mut s, _) = Store::open(&d, OPTS).unwrap();
        let offsets: Vec<u64> = (0..20).map(|i| s.append(format!("r{i:02}").as_bytes()).unwrap()).collect();
        let segments_before = s.segments.len();
        // The acknowledgement cannot be written (here: its temporary name is taken by a folder,
        // as a full disk would refuse it).
        fs::create_dir(d.join("ack.tmp")).unwrap();
        assert!(s.ack(offsets[15]).is_err());
        assert!(s.segments.len() < segments_before, "delivered segments were deleted all the same");
        assert!(s.ack_pending());
        // Space returns: the next call writes the acknowledgement without new deliveries.
        fs::remove_dir(d.join("ack.tmp")).unwrap();
        s.ack(offsets[15]).unwrap();
        assert!(!s.ack_pending());
        drop(s);
        let (s, _) = Store::open(&d, OPTS).unwrap();
        assert_eq!(s.acked(), offsets[15]);
        assert_eq!(pending_weight(&s.pending_segments(), one), 5);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_record_in_a_sealed_segment_is_counted_and_the_rest_read() {
        let d = dir("corrupt");
        let (mut s, _) = Store::open(&d, OPTS).unwrap();
        let offsets: Vec<u64> = (0..20).map(|i| s.append(format!("record-{i:02}").as_bytes()).unwrap()).collect();
        s.sync().unwrap();
        // Flip a byte inside the payload of record 1 (in the first, sealed segment).
        let seg = s.segments[0].path.clone();
        let mut bytes = fs::read(&seg).unwrap();
        let at = (offsets[1] - s.segments[0].base + HEADER + 3) as usize;
        bytes[at] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let got = s.read_from(0, usize::MAX).unwrap();
        assert_eq!(got.len(), 19, "only the damaged record is skipped");
        assert_eq!(got[1].1, b"record-02", "reading goes on after it");
        assert_eq!(s.take_corrupt(), 1, "and it is counted");
        s.read_from(0, usize::MAX).unwrap();
        assert_eq!(s.take_corrupt(), 0, "a second read does not count it again");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_ack_file_resends_rather_than_loses() {
        let d = dir("badack");
        let (mut s, _) = Store::open(&d, OPTS).unwrap();
        let a = s.append(b"one").unwrap();
        s.append(b"two").unwrap();
        s.ack(a + 11).unwrap();
        drop(s);
        fs::write(d.join("ack"), [1u8; 12]).unwrap();
        let (s, _) = Store::open(&d, OPTS).unwrap();
        assert_eq!(pending_weight(&s.pending_segments(), one), 2);
        assert_eq!(s.acked(), 0);
        let _ = fs::remove_dir_all(&d);
    }
}
