//! The writing half of a sink: a thread that turns the hub's batches into buffer records.
//!
//! It owns every write to the sink's store, so disk I/O never runs on the async runtime. Each batch
//! is filtered, encoded and appended at once (a killed process loses nothing the thread saw: the
//! data is in the page cache); `fdatasync` runs once per `flush_interval` for all of them (group
//! commit: a power cut loses at most that interval). The same tick applies the transport's
//! acknowledgements to the store.
//!
//! When the disk refuses a write (full, read-only, failing), records are held in memory up to
//! `memory_bytes` and written out in order once the disk accepts writes again: a full disk
//! degrades the sink, it never stops the gateway. Past `memory_bytes`, under drop-oldest the
//! oldest segment on disk makes room (the disk filled before the cap); failing that, the oldest
//! held records go. Every drop is counted.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use super::codec::{self, Dict, DictEntry};
use super::store::{self, Store, StoreOptions};
use super::{SinkStats, Source};
use crate::base::point::Batch;
use crate::config::{NorthBuffer, OnFull};

/// Segment size: small enough that acknowledged data is deleted promptly and that the cap (which
/// drops whole segments) is kept to within an eighth, large enough that a 1 GiB buffer is a few
/// hundred files.
fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(64 << 10, 8 << 20)
}

/// The sink's buffer clock: milliseconds that only move forward while the gateway runs, carried
/// across restarts in the `clock` file. `max_age` is measured on it, from when a record was
/// buffered: a wall clock that jumps (an industrial PC that boots in 1970 and syncs NTP later, or
/// one set years ahead) neither expires a backlog at once nor keeps it for ever. It starts at the
/// wall clock on first use, so records are stamped with times close to their points' (cheap to
/// encode); the downtime between two runs counts when the wall clock gives a plausible one.
#[derive(Debug)]
pub struct Clock {
    base_ms: i64,
    started: std::time::Instant,
}

/// Longest downtime between two runs that is believed; beyond it (or below zero) the wall clock
/// is taken to have jumped and the downtime counts for nothing, which errs towards keeping data.
const MAX_DOWNTIME_MS: i64 = 366 * 24 * 3600 * 1000;

impl Clock {
    fn open(dir: &Path, name: &str) -> Clock {
        let wall = crate::base::point::now_ms();
        let base_ms = match read_clock(dir) {
            Some((buffer_ms, saved_wall)) => {
                let down = wall - saved_wall;
                if (0..=MAX_DOWNTIME_MS).contains(&down) {
                    buffer_ms + down
                } else {
                    warn!(sink = %name, downtime_ms = down, "The wall clock jumped since the last run; the downtime does not count towards max_age.");
                    buffer_ms
                }
            }
            None => wall,
        };
        Clock { base_ms, started: std::time::Instant::now() }
    }

    /// The buffer clock now.
    pub fn now_ms(&self) -> i64 {
        self.base_ms + self.started.elapsed().as_millis() as i64
    }

    fn save(&self, dir: &Path) -> std::io::Result<()> {
        write_clock(dir, self.now_ms(), crate::base::point::now_ms())
    }
}

fn read_clock(dir: &Path) -> Option<(i64, i64)> {
    let b = std::fs::read(dir.join("clock")).ok()?;
    if b.len() != 20 || crc32fast::hash(&b[..16]) != u32::from_le_bytes(b[16..20].try_into().ok()?) {
        return None;
    }
    Some((i64::from_le_bytes(b[..8].try_into().ok()?), i64::from_le_bytes(b[8..16].try_into().ok()?)))
}

/// Writes the buffer clock and the wall clock beside it, atomically.
pub fn write_clock(dir: &Path, buffer_ms: i64, wall_ms: i64) -> std::io::Result<()> {
    let mut b = buffer_ms.to_le_bytes().to_vec();
    b.extend_from_slice(&wall_ms.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join("clock.tmp");
    std::fs::write(&tmp, &b)?;
    std::fs::rename(&tmp, dir.join("clock"))
}

/// How often the buffer clock is saved.
const CLOCK_SAVE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the two halves of a sink share.
#[derive(Debug)]
pub struct Shared {
    pub name: String,
    pub store: Mutex<Store>,
    pub dict: Arc<RwLock<Vec<Arc<DictEntry>>>>,
    /// Woken after each append.
    pub appended: Notify,
    /// Everything before this offset was acknowledged by the cloud; the buffer thread applies it.
    pub ack_to: AtomicU64,
    pub stats: Arc<SinkStats>,
    pub opts: NorthBuffer,
    /// Points pending when the store was opened (weighed in the background after start-up).
    pending_at_open: AtomicU64,
    /// The sink's counters when the store was opened (accepted, settled): a sink restarted by a
    /// reload keeps its counters, and its pending points are counted from the store it reopens.
    baseline: (u64, u64),
    /// The store's accounting position (`Store::counted`): the reader counts a record as delivered
    /// only if it moves this past it, so a record dropped at the cap in flight is counted once.
    pub counted_to: Arc<AtomicU64>,
    /// The buffer clock records are stamped with and aged on.
    pub clock: Clock,
    dir: std::path::PathBuf,
}

impl Shared {
    /// The sink's buffer folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Opens (and repairs) a sink's buffer. The dictionary goes to the buffer thread, its only writer.
pub fn open(name: &str, dir: &Path, opts: &NorthBuffer, stats: Arc<SinkStats>) -> std::io::Result<(Arc<Shared>, Dict)> {
    let err = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("sink `{name}`: {what} {}: {e}", dir.display()))
    };
    let store_opts = StoreOptions {
        segment_bytes: segment_bytes(opts.max_bytes.0),
        max_bytes: opts.max_bytes.0,
        weigh: codec::count,
    };
    let (store, report) = Store::open(dir, store_opts).map_err(|e| err("cannot open the buffer in", e))?;
    let dict = Dict::open(dir).map_err(|e| err("cannot read the tag dictionary in", e))?;
    if report.truncated_bytes > 0 {
        warn!(sink = %name, bytes = report.truncated_bytes, "Cut a torn tail from the buffer (an interrupted write, e.g. a power cut).");
        stats.truncated_bytes.add(report.truncated_bytes);
    }
    stats.disk_ok.set(1);
    stats.buffer_bytes.set(store.pending_bytes() as i64);
    let acked = store.acked();
    let (pending_segments, pending_bytes) = (store.pending_segments(), store.pending_bytes());
    let counted_to = store.counted();
    let clock = Clock::open(dir, name);
    let baseline = (stats.accepted.get(), settled(&stats));
    let shared = Arc::new(Shared {
        counted_to,
        clock,
        dir: dir.to_owned(),
        name: name.to_owned(),
        store: Mutex::new(store),
        dict: dict.entries(),
        appended: Notify::new(),
        ack_to: AtomicU64::new(acked),
        stats,
        opts: opts.clone(),
        pending_at_open: AtomicU64::new(0),
        baseline,
    });
    if pending_bytes > 0 && pending_bytes <= COUNT_INLINE {
        // A small backlog (a reload, a short outage) is counted at once, so the pending gauge,
        // `/ready` and the dashboard never read low for it.
        let points = store::pending_weight(&pending_segments, codec::count);
        shared.pending_at_open.store(points, Ordering::Release);
        shared.stats.pending_points.set(points as i64);
        info!(sink = %name, points, bytes = pending_bytes, "Buffered points from before the restart will be sent.");
    } else if pending_bytes > 0 {
        // Counting the points of a large backlog reads all of it: a background job, so polling
        // starts at once after a restart. Until it finishes the pending gauge reads low.
        let s = shared.clone();
        std::thread::Builder::new().name(format!("north-{name}-count")).spawn(move || {
            let points = store::pending_weight(&pending_segments, codec::count);
            s.pending_at_open.store(points, Ordering::Release);
            info!(sink = %s.name, points, bytes = pending_bytes, "Buffered points from before the restart will be sent.");
        })?;
    }
    Ok((shared, dict))
}

/// Starts the buffer thread. It runs until the hub closes its queue, then syncs and applies the
/// last acknowledgements.
pub fn spawn(
    name: &str,
    mut rx: mpsc::Receiver<Batch>,
    sources: Vec<Source>,
    shared: Arc<Shared>,
    dict: Dict,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let flush_interval = shared.opts.flush_interval.0;
    std::thread::Builder::new().name(format!("north-{name}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!(sink = %shared.name, error = %e, "Cannot start the buffer thread.");
                return;
            }
        };
        let mut w = Writer::new(shared, dict, sources);
        rt.block_on(async {
            let mut tick = tokio::time::interval(flush_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    batch = rx.recv() => match batch {
                        Some(b) => w.ingest(&b),
                        None => break,
                    },
                    _ = tick.tick() => w.flush(),
                }
            }
        });
        // The last save marks when this run stopped, for the next run's downtime.
        w.clock_saved = None;
        w.flush();
    })
}

/// Which points a sink takes, decided once per tag.
struct Selection {
    sources: Vec<Source>,
    /// Registry id → 1 selected, 2 not, 0 not yet known.
    by_id: Vec<u8>,
}

impl Selection {
    fn wants(&mut self, key: &crate::base::point::TagKey) -> bool {
        let i = key.id as usize;
        if self.by_id.len() <= i {
            self.by_id.resize(i + 1, 0);
        }
        if self.by_id[i] == 0 {
            self.by_id[i] = if self.sources.iter().any(|s| s.matches(key)) { 1 } else { 2 };
        }
        self.by_id[i] == 1
    }
}

struct Writer {
    shared: Arc<Shared>,
    dict: Dict,
    selection: Selection,
    buf: Vec<u8>,
    /// Records (with their point counts) the disk refused, oldest first.
    held: VecDeque<(Vec<u8>, u64)>,
    held_bytes: u64,
    dirty: bool,
    store_dropped_seen: u64,
    rejected_logged: u64,
    ack_failing: bool,
    clock_saved: Option<std::time::Instant>,
}

impl Writer {
    fn new(shared: Arc<Shared>, dict: Dict, sources: Vec<Source>) -> Self {
        Writer {
            shared,
            dict,
            selection: Selection { sources, by_id: Vec::new() },
            buf: Vec::with_capacity(4096),
            held: VecDeque::new(),
            held_bytes: 0,
            dirty: false,
            store_dropped_seen: 0,
            rejected_logged: 0,
            ack_failing: false,
            // Saved at the first tick, so a short run still leaves its clock behind.
            clock_saved: None,
        }
    }

    fn ingest(&mut self, batch: &Batch) {
        let mut buf = std::mem::take(&mut self.buf);
        let selection = &mut self.selection;
        let now = self.shared.clock.now_ms();
        let n = codec::encode(&mut self.dict, batch.iter().filter(|p| selection.wants(&p.key)), now, &mut buf) as u64;
        if n > 0 {
            self.write(&buf, n);
        }
        self.buf = buf;
    }

    fn write(&mut self, record: &[u8], n: u64) {
        let stats = self.shared.stats.clone();
        // Behind held records, a new one must wait its turn, or order would break.
        if !self.held.is_empty() {
            self.hold(record.to_vec(), n);
            return;
        }
        if let Err(e) = self.dict.persist() {
            self.disk_failed(&e);
            self.hold(record.to_vec(), n);
            return;
        }
        let mut store = self.shared.store();
        if self.shared.opts.on_full == OnFull::RejectNew
            && store.pending_bytes() + record.len() as u64 > self.shared.opts.max_bytes.0
        {
            drop(store);
            stats.dropped_full.add(n);
            let total = stats.dropped_full.get();
            if self.rejected_logged == 0 || total / 10_000 > self.rejected_logged / 10_000 {
                warn!(sink = %self.shared.name, dropped_points = total, "Buffer full (on_full = \"reject-new\"); new points are dropped.");
            }
            self.rejected_logged = total;
            return;
        }
        match store.append(record) {
            Ok(_) => {
                drop(store);
                stats.accepted.add(n);
                self.dirty = true;
                self.shared.appended.notify_one();
                if stats.disk_ok.get() == 0 {
                    info!(sink = %self.shared.name, "The buffer's disk accepts writes again.");
                    stats.disk_ok.set(1);
                }
            }
            Err(e) => {
                drop(store);
                self.disk_failed(&e);
                self.hold(record.to_vec(), n);
            }
        }
    }

    fn disk_failed(&mut self, e: &std::io::Error) {
        let stats = &self.shared.stats;
        stats.disk_errors.inc();
        if stats.disk_ok.get() == 1 {
            error!(sink = %self.shared.name, error = %e, memory_cap = %bytesize::ByteSize(self.shared.opts.memory_bytes.0),
                "The buffer's disk refuses writes; holding new points in memory until it recovers.");
        }
        stats.disk_ok.set(0);
    }

    fn hold(&mut self, record: Vec<u8>, n: u64) {
        self.shared.stats.accepted.add(n);
        self.held_bytes += record.len() as u64;
        self.held.push_back((record, n));
        while self.held_bytes > self.shared.opts.memory_bytes.0 {
            // The disk filled before the cap did (a cap larger than the free space, or other
            // files), and memory is full too: under drop-oldest the oldest data overall is on
            // disk, so that goes, and the held records take its place.
            if self.shared.opts.on_full == OnFull::DropOldest && self.make_room() {
                continue;
            }
            let stats = &self.shared.stats;
            let Some((r, n)) = self.held.pop_front() else { break };
            self.held_bytes -= r.len() as u64;
            stats.dropped_disk.add(n);
            let total = stats.dropped_disk.get();
            if total == n || total / 10_000 > (total - n) / 10_000 {
                warn!(sink = %self.shared.name, dropped_points = total, "Memory hold full while the disk refuses writes; oldest points dropped.");
            }
        }
    }

    /// Drops the oldest segment on disk and writes held records into the space; true if any were.
    /// The tag dictionary goes first: a record whose new tag ids are not on disk could not be
    /// decoded after a restart.
    fn make_room(&mut self) -> bool {
        match self.shared.store().drop_oldest() {
            Ok(true) => {}
            _ => return false,
        }
        warn!(sink = %self.shared.name, "Disk and memory hold full: dropped the oldest buffered points to keep the newest (on_full = \"drop-oldest\").");
        if let Err(e) = self.dict.persist() {
            self.disk_failed(&e);
            return false;
        }
        let mut store = self.shared.store();
        let mut wrote = false;
        while let Some((r, _)) = self.held.front() {
            if store.append(r).is_err() {
                break;
            }
            let (r, _) = self.held.pop_front().expect("checked");
            self.held_bytes -= r.len() as u64;
            self.dirty = true;
            wrote = true;
        }
        wrote
    }

    /// Writes held records, syncs, applies acknowledgements and refreshes the gauges.
    fn flush(&mut self) {
        if self.clock_saved.is_none_or(|at| at.elapsed() >= CLOCK_SAVE) {
            // A failure (full disk) only means the next run counts less downtime.
            let _ = self.shared.clock.save(&self.shared.dir);
            self.clock_saved = Some(std::time::Instant::now());
        }
        if !self.held.is_empty() {
            if let Err(e) = self.dict.persist() {
                self.disk_failed(&e);
            } else {
                let mut store = self.shared.store();
                while let Some((r, _)) = self.held.front() {
                    match store.append(r) {
                        Ok(_) => {
                            self.dirty = true;
                            let (r, _) = self.held.pop_front().expect("checked");
                            self.held_bytes -= r.len() as u64;
                        }
                        Err(_) => break,
                    }
                }
                drop(store);
                if self.held.is_empty() {
                    self.shared.appended.notify_one();
                    if self.shared.stats.disk_ok.get() == 0 {
                        info!(sink = %self.shared.name, "The buffer's disk accepts writes again.");
                        self.shared.stats.disk_ok.set(1);
                    }
                }
            }
        }
        if self.dirty {
            // The sync runs on a second handle, outside the store's lock: the reader (on an async
            // worker) must never wait for a slow disk's fdatasync.
            let handle = self.shared.store().sync_handle();
            match handle.and_then(|f| store::durable(&f)) {
                Ok(()) => self.dirty = false,
                Err(e) => self.disk_failed(&e),
            }
        }
        let mut store = self.shared.store();
        let target = self.shared.ack_to.load(Ordering::Acquire);
        if target > store.acked() || store.ack_pending() {
            match store.ack(target) {
                Ok(()) => self.ack_failing = false,
                // Not fatal: the acknowledgement is retried next tick, and a restart meanwhile only
                // means resending. Logged once per failure spell, not every tick.
                Err(e) if !self.ack_failing => {
                    self.ack_failing = true;
                    warn!(sink = %self.shared.name, error = %e, "Cannot record delivered points; will retry.");
                }
                Err(_) => {}
            }
        }
        let stats = &self.shared.stats;
        let newly_dropped = store.dropped - self.store_dropped_seen;
        if newly_dropped > 0 {
            self.store_dropped_seen = store.dropped;
            stats.dropped_full.add(newly_dropped);
            warn!(sink = %self.shared.name, dropped_points = newly_dropped, "Buffer full (on_full = \"drop-oldest\"); oldest points dropped.");
        }
        stats.buffer_bytes.set(store.pending_bytes() as i64);
        drop(store);
        let (accepted_before, settled_before) = self.shared.baseline;
        let settled = (settled(stats) + self.store_dropped_seen).saturating_sub(settled_before);
        let accepted = stats.accepted.get().saturating_sub(accepted_before);
        let pending = (self.shared.pending_at_open.load(Ordering::Acquire) + accepted).saturating_sub(settled);
        stats.pending_points.set(pending as i64);
        if pending == 0 {
            stats.caught_up_ms.set(crate::base::point::now_ms());
        }
    }
}

/// Largest backlog counted before the sink starts (about half a million points); a larger one is
/// counted in the background.
const COUNT_INLINE: u64 = 4 << 20;

/// Points that left the buffer other than by the store's own cap: acknowledged or dropped.
fn settled(stats: &SinkStats) -> u64 {
    stats.delivered.get()
        + stats.dropped_expired.get()
        + stats.dropped_rejected.get()
        + stats.dropped_corrupt.get()
        + stats.dropped_reserved.get()
        + stats.dropped_poison.get()
        + stats.dropped_disk.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::{Point, Registry, Value};
    use crate::config::Bytes;

    fn run(on_full: OnFull) -> (Arc<Shared>, Arc<SinkStats>, u64) {
        let dir = crate::sinks::scratch_dir("buffer");
        let stats = Arc::new(SinkStats::default());
        let opts = NorthBuffer { max_bytes: Bytes(256 << 10), on_full, ..NorthBuffer::default() };
        let opts = NorthBuffer { flush_interval: crate::config::Dur::from_millis(10), ..opts };
        let (shared, dict) = open("t", &dir, &opts, stats.clone()).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let sources = vec![Source::parse("*/*").unwrap()];
        let thread = spawn("t", rx, sources, shared.clone(), dict).unwrap();
        let r = Registry::default();
        let keys: Vec<_> = (0..100).map(|i| r.intern("press", &format!("t{i}"))).collect();
        let batches = 2000u64;
        for b in 0..batches {
            let points: Vec<Point> =
                keys.iter().map(|k| Point::good(k.clone(), Value::Int(b as i64), b as i64)).collect();
            tx.blocking_send(crate::hub::batch(points)).unwrap();
        }
        drop(tx);
        thread.join().unwrap();
        (shared, stats, batches * 100)
    }

    /// The values of the records left in the buffer, one per record.
    fn left(shared: &Shared) -> Vec<i64> {
        let store = shared.store();
        let records = store.read_from(store.acked(), usize::MAX).unwrap();
        records
            .iter()
            .map(|(_, r)| match codec::decode(r).unwrap()[0].value.clone() {
                Some(Value::Int(v)) => v,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts_every_dropped_point() {
        let (shared, stats, offered) = run(OnFull::DropOldest);
        let kept = left(&shared);
        assert!(stats.dropped_full.get() > 0, "the cap was reached");
        assert_eq!(stats.accepted.get(), offered);
        assert_eq!(stats.dropped_full.get() + kept.len() as u64 * 100, offered, "every point is kept or counted");
        assert_eq!(kept.last(), Some(&1999), "the newest survive");
        assert!(kept.windows(2).all(|w| w[1] == w[0] + 1), "what is kept is contiguous");
        assert!(shared.store().pending_bytes() <= (256 << 10) + (64 << 10));
        assert_eq!(stats.pending_points.get(), kept.len() as i64 * 100);
    }

    #[test]
    fn reject_new_keeps_the_oldest_and_counts_every_refused_point() {
        let (shared, stats, offered) = run(OnFull::RejectNew);
        let kept = left(&shared);
        assert!(stats.dropped_full.get() > 0);
        assert_eq!(stats.accepted.get() + stats.dropped_full.get(), offered, "every point is taken or counted");
        assert_eq!(kept.first(), Some(&0), "the oldest survive");
        assert_eq!(kept.len() as u64 * 100, stats.accepted.get());
        assert!(shared.store().pending_bytes() <= 256 << 10);
    }

    /// A small tmpfs, unmounted on drop; `None` where mounting is not allowed (not root).
    struct Tmpfs(std::path::PathBuf);

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            let at = crate::sinks::scratch_dir("tmpfs");
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&at)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Tmpfs(at))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    /// A full disk while new tags show up: once memory is full too, the oldest segment makes room
    /// for the held records, and the dictionary entries they use must reach the disk before them.
    #[test]
    fn after_making_room_on_a_full_disk_new_tags_still_decode() {
        // Segments (64 KiB) as large as the memory hold: the space one dropped segment frees is
        // filled again by the held records, so nothing written later persists the dictionary.
        let Some(fs) = Tmpfs::mount("448k") else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return;
        };
        let dir = fs.0.join("north");
        let stats = Arc::new(SinkStats::default());
        let opts = NorthBuffer {
            max_bytes: Bytes(512 << 10),
            memory_bytes: Bytes(64 << 10),
            flush_interval: crate::config::Dur::from_millis(10),
            ..NorthBuffer::default()
        };
        let (shared, dict) = open("t", &dir, &opts, stats.clone()).unwrap();
        let (tx, rx) = mpsc::channel(4);
        let thread = spawn("t", rx, vec![Source::parse("*/*").unwrap()], shared.clone(), dict).unwrap();
        let r = Registry::default();
        let old: Vec<_> = (0..50).map(|i| r.intern("old", &format!("t{i}"))).collect();
        // Fill the file system with the old tags' records until the disk refuses them.
        let mut b = 0i64;
        while stats.disk_ok.get() != 0 || b < 10 {
            let points = old.iter().map(|k| Point::good(k.clone(), Value::Float(b as f64 + 0.5), b)).collect();
            tx.blocking_send(crate::hub::batch(points)).unwrap();
            b += 1;
            assert!(b < 1_000_000, "the disk never filled");
        }
        // New tags now: their dictionary entries cannot be written, their records are held; past
        // the memory hold, the oldest segment goes and the held records take its place.
        // Long names, so their dictionary lines need fresh pages rather than the slack of the last one.
        let new: Vec<_> = (0..50).map(|i| r.intern("new", &format!("n{i}-{}", "x".repeat(200)))).collect();
        for b in 0..400i64 {
            let points = new.iter().map(|k| Point::good(k.clone(), Value::Float(b as f64 + 0.25), b)).collect();
            tx.blocking_send(crate::hub::batch(points)).unwrap();
        }
        drop(tx);
        thread.join().unwrap();
        assert!(stats.dropped_full.get() > 0, "room was made by dropping the oldest segment");
        // A restart: every record on disk must decode to names.
        drop(shared);
        let (store, _) =
            Store::open(&dir, StoreOptions { segment_bytes: 64 << 10, max_bytes: 512 << 10, weigh: codec::count })
                .unwrap();
        let names = Dict::open(&dir).unwrap().entries();
        let names = names.read().unwrap();
        let records = store.read_from(store.acked(), usize::MAX).unwrap();
        let mut new_points = 0;
        for (_, rec) in &records {
            for p in codec::decode(rec).unwrap() {
                let e = names.get(p.id as usize).unwrap_or_else(|| panic!("tag id {} has no name on disk", p.id));
                new_points += usize::from(&*e.device == "new");
            }
        }
        assert!(new_points > 0, "records of the new tags were written in the freed space");
    }
}
