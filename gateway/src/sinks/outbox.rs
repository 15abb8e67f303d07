//! The reading half of a sink: records from the buffer become cloud messages, and cloud
//! acknowledgements become the buffer's acknowledged position.
//!
//! Points are grouped by destination (the rendered topic or URL: one per device by default) into
//! messages of at most `max_points`. By default a message is sealed when the buffer record that
//! filled it ends (a record is one poll of one device), so fresh data leaves at once; with
//! `max_wait`, groups stay open across records until full or `max_wait` after their first point. A record
//! is acknowledged once every message holding one of its points is, and only in order, so the
//! acknowledged position never passes a point the cloud has not confirmed. Messages of one group
//! leave in order, so each device's points arrive in the order they were read.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::buffer::Shared;
use super::codec::{self, Decoded, DictEntry};
use super::store::{Store, FRAME_OVERHEAD};
use crate::base::point::{now_ms, Quality};
use crate::base::topic::{Template, Vars};
use crate::config::NorthBatch;

/// Records read from the buffer per refill.
const READ_RECORDS: usize = 256;
/// How often partial messages are checked for their `max_wait` while others keep flowing.
const DUE_CHECK: Duration = Duration::from_millis(50);

/// Which records a message holds points of: (record index, points) runs.
#[derive(Debug, Clone)]
pub struct Token {
    generation: u64,
    runs: Vec<(u64, u32)>,
}

/// One message ready to send.
#[derive(Debug)]
pub struct Message {
    /// The rendered topic (MQTT) or URL (HTTP).
    pub target: String,
    pub payload: Vec<u8>,
    /// Points in the message.
    pub points: u64,
    /// A plugin's verbatim message rather than a JSON batch of points.
    pub raw: bool,
    pub token: Token,
    /// The buffer offset of the first record it holds points of: with `target`, what identifies
    /// the message across reconnects (a rewind rebuilds the same messages from the same records).
    pub first_offset: u64,
}

#[derive(Debug)]
struct Rec {
    start: u64,
    end: u64,
    points: u64,
    /// Points not yet settled (acknowledged, expired or rejected).
    remaining: u64,
    rejected: u64,
    expired: u64,
    reserved: u64,
    poison: u64,
}

#[derive(Debug)]
struct Group {
    device: Arc<str>,
    json: Vec<u8>,
    points: u32,
    runs: Vec<(u64, u32)>,
    first_offset: u64,
    since: Instant,
}

pub struct Outbox {
    shared: Arc<Shared>,
    gateway: String,
    template: Template,
    /// The rendered destination per dictionary id, so the template is filled once per tag; `None`
    /// inside when it is a reserved topic.
    targets: Vec<Option<Option<String>>>,
    /// Topic filters no message may be sent to (the sink's command and status topics).
    reserved: Vec<Vec<String>>,
    /// Largest message body; groups are sealed before they grow past it.
    max_bytes: usize,
    /// Messages (first offset, target) the transport found poisonous: quarantined when they are
    /// built again instead of sent.
    poison: std::collections::HashSet<(u64, String)>,
    max_points: usize,
    /// `None`: seal every group at the end of the record that filled it.
    max_wait: Option<Duration>,
    max_age_ms: i64,
    /// Store offset of the next record to read.
    cursor: u64,
    /// Records read and not yet settled, oldest first; `first` is the index of the front one.
    records: VecDeque<Rec>,
    first: u64,
    groups: HashMap<String, Group>,
    ready: VecDeque<Message>,
    generation: u64,
    last_due_check: Instant,
}

impl Outbox {
    /// `template` is the destination (topic or URL) with `{gateway}`, `{device}`, `{tag}`, `{topic}`.
    pub fn new(shared: Arc<Shared>, gateway: &str, template: &Template, batch: &NorthBatch, max_age: Duration) -> Self {
        let cursor = shared.ack_to.load(Ordering::Acquire);
        Outbox {
            shared,
            gateway: gateway.to_owned(),
            template: template.clone(),
            targets: Vec::new(),
            reserved: Vec::new(),
            max_bytes: usize::MAX,
            poison: Default::default(),
            max_points: batch.max_points.max(1),
            max_wait: batch.max_wait.map(|d| d.0),
            max_age_ms: max_age.as_millis().min(i64::MAX as u128) as i64,
            cursor,
            records: VecDeque::new(),
            first: 0,
            groups: HashMap::new(),
            ready: VecDeque::new(),
            generation: 0,
            last_due_check: Instant::now(),
        }
    }

    /// Topic filters whose topics no message may go to; a point rendered there is dropped and
    /// counted (`reserved`).
    pub fn reserve(&mut self, filters: &[String]) {
        self.reserved = filters.iter().map(|f| f.split('/').map(str::to_owned).collect()).collect();
        self.targets.clear();
    }

    /// The largest message body the cloud takes: groups are sealed before they reach it, and a
    /// single message larger than it (a plugin's or a local client's) is quarantined unsent.
    pub fn limit_size(&mut self, max_bytes: u64) {
        self.max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    }

    /// Marks the message built from `first_offset` for `target` as poison: when it comes up again
    /// (after the rewind that follows the lost connection) it is quarantined, not sent.
    pub fn mark_poison(&mut self, first_offset: u64, target: &str) {
        self.poison.insert((first_offset, target.to_owned()));
    }

    /// Moves a message aside into `quarantine/` (its payload, plus a line in `index.jsonl` with
    /// its destination and why) and settles its points as `poison`: one message the cloud cannot
    /// take must not stall everything behind it. The file write is rare and small.
    pub fn quarantine(&mut self, msg: Message, why: &str) {
        let dir = self.shared.dir().join("quarantine");
        let name = format!("{}-{}.msg", now_ms(), msg.first_offset);
        let line = serde_json::json!({
            "file": name, "target": msg.target, "points": msg.points, "reason": why, "at": now_ms(),
        });
        let written = blocking(|| {
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(&name), &msg.payload)).and_then(|()| {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("index.jsonl"))?;
                writeln!(f, "{line}")
            })
        });
        match written {
            Ok(()) => {
                error!(sink = %self.shared.name, target = %msg.target, points = msg.points, reason = %why, file = %dir.join(&name).display(),
                "Message quarantined: the cloud cannot take it; its points are counted as poison and the rest flows.")
            }
            Err(e) => {
                error!(sink = %self.shared.name, target = %msg.target, points = msg.points, reason = %why, error = %e,
                "Message dropped as poison (it could not be written to quarantine/); the rest flows.")
            }
        }
        self.settle(msg.token, Settle::Poison);
    }

    /// Forgets everything in flight and starts again from the first unacknowledged record: after a
    /// lost connection nothing sent in it can be trusted to have arrived.
    pub fn rewind(&mut self) {
        if let Some(front) = self.records.front() {
            self.cursor = front.start;
        }
        self.first += self.records.len() as u64;
        self.records.clear();
        self.groups.clear();
        self.ready.clear();
        self.generation += 1;
    }

    /// The next message to send, if one is due. Messages marked as poison, and messages larger
    /// than the cloud takes, are quarantined here instead of being returned.
    pub fn next_message(&mut self) -> Option<Message> {
        loop {
            let m = self.next_candidate()?;
            if m.payload.len() > self.max_bytes {
                let why = format!("{} bytes, over max_message_size ({} bytes)", m.payload.len(), self.max_bytes);
                self.quarantine(m, &why);
                continue;
            }
            if !self.poison.is_empty() && self.poison.remove(&(m.first_offset, m.target.clone())) {
                self.quarantine(m, "the cloud ended the connection on it every time it was sent");
                continue;
            }
            return Some(m);
        }
    }

    fn next_candidate(&mut self) -> Option<Message> {
        if self.ready.is_empty() {
            self.refill();
        }
        // Also on a clock: while a backlog drains, busy devices keep `ready` full, and a quiet
        // device's partial message must still leave on time (its records cannot be acknowledged,
        // nor the buffer shrink, until it does).
        if self.ready.is_empty() || self.last_due_check.elapsed() >= DUE_CHECK {
            self.last_due_check = Instant::now();
            self.flush_due(false);
        }
        self.ready.pop_front()
    }

    /// Messages that are due now, or all partial groups if `all`.
    fn flush_due(&mut self, all: bool) {
        let now = Instant::now();
        let mut due: Vec<(String, Instant)> = self
            .groups
            .iter()
            .filter(|(_, g)| all || self.max_wait.is_some_and(|w| now.duration_since(g.since) >= w))
            .map(|(k, g)| (k.clone(), g.since))
            .collect();
        due.sort_by_key(|(_, since)| *since);
        for (k, _) in due {
            if let Some(g) = self.groups.remove(&k) {
                self.seal(k, g);
            }
        }
    }

    /// When the oldest partial group falls due.
    pub fn deadline(&self) -> Option<Instant> {
        let wait = self.max_wait?;
        self.groups.values().map(|g| g.since + wait).min()
    }

    /// Waits until there may be something to send: new data, or a partial message falling due.
    pub async fn wait(&self) {
        match self.deadline() {
            Some(at) => {
                tokio::select! {
                    _ = self.shared.appended.notified() => {}
                    _ = tokio::time::sleep_until(at.into()) => {}
                }
            }
            None => self.shared.appended.notified().await,
        }
    }

    /// The cloud confirmed a message.
    pub fn done(&mut self, token: Token) {
        self.settle(token, Settle::Delivered);
    }

    /// The cloud refused a message for good: its points are counted as rejected, not delivered.
    pub fn rejected(&mut self, token: Token) {
        self.settle(token, Settle::Rejected);
    }

    fn settle(&mut self, token: Token, how: Settle) {
        if token.generation != self.generation {
            return;
        }
        for (idx, n) in token.runs {
            if let Some(r) = idx.checked_sub(self.first).and_then(|i| self.records.get_mut(i as usize)) {
                r.remaining = r.remaining.saturating_sub(u64::from(n));
                match how {
                    Settle::Delivered => {}
                    Settle::Rejected => r.rejected += u64::from(n),
                    Settle::Poison => r.poison += u64::from(n),
                }
            }
        }
        self.advance();
    }

    /// Pops settled records off the front and publishes the new acknowledged position.
    fn advance(&mut self) {
        let stats = &self.shared.stats;
        let mut acked = None;
        while self.records.front().is_some_and(|r| r.remaining == 0) {
            let r = self.records.pop_front().expect("checked");
            self.first += 1;
            acked = Some(r.end);
            // The buffer may have dropped this record at its cap while it was in flight, and
            // counted it then; it is not counted a second time.
            if self.shared.counted_to.fetch_max(r.end, Ordering::AcqRel) >= r.end {
                continue;
            }
            stats.delivered.add(r.points - r.expired - r.rejected - r.reserved - r.poison);
            stats.dropped_poison.add(r.poison);
            stats.dropped_expired.add(r.expired);
            stats.dropped_rejected.add(r.rejected);
            stats.dropped_reserved.add(r.reserved);
        }
        if let Some(end) = acked {
            self.shared.ack_to.fetch_max(end, Ordering::AcqRel);
            stats.last_ack_ms.set(crate::base::point::now_ms());
        }
    }

    fn refill(&mut self) {
        let read_at = |cursor: &mut u64, store: &Store| {
            // The buffer may have dropped its oldest data at the cap meanwhile.
            *cursor = (*cursor).max(store.acked());
            if *cursor >= store.end() {
                return None;
            }
            let read = store.read_from(*cursor, READ_RECORDS);
            self.shared.stats.dropped_corrupt.add(store.take_corrupt());
            Some(read)
        };
        // The usual case: the records were written a moment ago, so they are in the page cache
        // and the buffer thread is not holding the store. Reading them here costs microseconds;
        // handing the worker's tasks away first (`block_in_place`) cost a thread switch per read,
        // 40 % of the gateway's CPU at 100 polls a second (issue 13). A backlog, whose older
        // records may have left the cache, or a busy store still goes the blocking way.
        let fresh = match self.shared.store.try_lock() {
            Ok(store) if store.end().saturating_sub(self.cursor) <= FRESH_BYTES => {
                Some(read_at(&mut self.cursor, &store))
            }
            _ => None,
        };
        let read = match fresh {
            Some(read) => read,
            None => blocking(|| read_at(&mut self.cursor, &self.shared.store())),
        };
        let Some(read) = read else { return };
        let records = match read {
            Ok(r) => r,
            Err(e) => {
                warn!(sink = %self.shared.name, error = %e, "Cannot read the buffer; will retry.");
                return;
            }
        };
        let entries = self.shared.dict.clone();
        let entries = entries.read().unwrap_or_else(|e| e.into_inner());
        let oldest = now_ms() - self.max_age_ms;
        let buffer_now = self.shared.clock.now_ms();
        for (offset, payload) in records {
            let idx = self.first + self.records.len() as u64;
            let end = offset + FRAME_OVERHEAD + payload.len() as u64;
            self.cursor = end;
            let mut rec =
                Rec { start: offset, end, points: 0, remaining: 0, rejected: 0, expired: 0, reserved: 0, poison: 0 };
            let Some((points, buffered_at)) = codec::decode_record(&payload) else {
                let n = codec::count(&payload);
                warn!(sink = %self.shared.name, offset, points = n, "Skipping a buffer record that cannot be decoded.");
                self.shared.stats.dropped_corrupt.add(n);
                self.records.push_back(rec);
                continue;
            };
            rec.points = points.len() as u64;
            for p in &points {
                let Some(entry) = entries.get(p.id as usize) else {
                    self.shared.stats.dropped_corrupt.inc();
                    rec.points -= 1;
                    continue;
                };
                // Aged by the buffer clock since the record was buffered; records from before it
                // was stamped, by the point's own time.
                let expired = match buffered_at {
                    Some(at) => buffer_now.saturating_sub(at) > self.max_age_ms,
                    None => p.ts < oldest,
                };
                if expired {
                    rec.expired += 1;
                    continue;
                }
                let Some(target) = self.target(p.id, entry) else {
                    rec.reserved += 1;
                    continue;
                };
                rec.remaining += 1;
                if let Some(payload) = &p.payload {
                    // A plugin's own message: sent as is, after what its group already holds.
                    if let Some(g) = self.groups.remove(&target) {
                        self.seal(target.clone(), g);
                    }
                    let token = Token { generation: self.generation, runs: vec![(idx, 1)] };
                    let msg =
                        Message { target, payload: payload.clone(), points: 1, raw: true, token, first_offset: offset };
                    self.ready.push_back(msg);
                    continue;
                }
                let g = self.groups.entry(target.clone()).or_insert_with(|| Group {
                    device: entry.device.clone(),
                    // Small at first: with `{tag}` in the template there is a group per tag.
                    json: Vec::with_capacity(256),
                    points: 0,
                    runs: Vec::new(),
                    first_offset: offset,
                    since: Instant::now(),
                });
                if g.points > 0 {
                    g.json.push(b',');
                }
                write_point(&mut g.json, &entry.tag, p);
                g.points += 1;
                match g.runs.last_mut() {
                    Some((i, n)) if *i == idx => *n += 1,
                    _ => g.runs.push((idx, 1)),
                }
                // Full by count, or by size: one more point of the longest kind would not fit.
                if g.points as usize >= self.max_points || g.json.len() + MAX_POINT_JSON + 128 >= self.max_bytes {
                    let g = self.groups.remove(&target).expect("just used");
                    self.seal(target, g);
                }
            }
            self.records.push_back(rec);
            if self.max_wait.is_none() && !self.groups.is_empty() {
                // The poll is complete: its messages leave now, oldest group first.
                self.flush_due(true);
            }
        }
        drop(entries);
        // Records with nothing to send (all expired, say) settle at once.
        self.advance();
    }

    fn target(&mut self, id: u32, e: &DictEntry) -> Option<String> {
        let i = id as usize;
        if self.targets.len() <= i {
            self.targets.resize(i + 1, None);
        }
        let (template, gateway, reserved, name) = (&self.template, &self.gateway, &self.reserved, &self.shared.name);
        self.targets[i]
            .get_or_insert_with(|| {
                let t = template.render(&Vars { gateway, device: &e.device, tag: &e.tag, topic: &e.topic, ..Vars::default() });
                if reserved.iter().any(|f| super::filter_matches(f, &t)) {
                    warn!(sink = %name, topic = %t, local = %e.topic, "Not forwarding to one of the sink's own control topics (commands, status); dropped and counted as reserved.");
                    return None;
                }
                Some(t)
            })
            .clone()
    }

    fn seal(&mut self, target: String, g: Group) {
        let mut payload = Vec::with_capacity(g.json.len() + 64 + target.len());
        payload.extend_from_slice(b"{\"gateway\":");
        let _ = serde_json::to_writer(&mut payload, &self.gateway);
        payload.extend_from_slice(b",\"device\":");
        let _ = serde_json::to_writer(&mut payload, &*g.device);
        payload.extend_from_slice(b",\"points\":[");
        payload.extend_from_slice(&g.json);
        payload.extend_from_slice(b"]}");
        let token = Token { generation: self.generation, runs: g.runs };
        let first_offset = g.first_offset;
        self.ready.push_back(Message { target, payload, points: u64::from(g.points), raw: false, token, first_offset });
    }
}

/// Runs disk work that may block (reading the buffer, waiting for its lock while the buffer
/// thread writes) without starving the async runtime: on a multi-threaded runtime the worker hands
/// its other tasks away first (`block_in_place`), so device polls and the broker go on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// How far behind the end of the buffer a read may start and still be taken as fresh (written
/// moments ago, so still in the page cache): a few polls' worth of records.
const FRESH_BYTES: u64 = 1 << 20;

/// How a message's points are settled.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Delivered,
    Rejected,
    Poison,
}

/// Room kept in a message for one more point: a 128-byte tag name, a 24-digit value, the time and
/// an error text of a few hundred bytes.
const MAX_POINT_JSON: usize = 640;

/// `{"tag":"t","value":21.7,"ts":1732860000123,"quality":"good"}`, plus `"error"` when bad.
fn write_point(out: &mut Vec<u8>, tag: &str, p: &Decoded) {
    out.extend_from_slice(b"{\"tag\":");
    let _ = serde_json::to_writer(&mut *out, tag);
    out.extend_from_slice(b",\"value\":");
    let _ = serde_json::to_writer(&mut *out, &p.value);
    out.extend_from_slice(b",\"ts\":");
    let _ = write!(out, "{}", p.ts);
    out.extend_from_slice(if p.quality == Quality::Good { b",\"quality\":\"good\"" } else { b",\"quality\":\"bad\"" });
    if let Some(e) = &p.error {
        out.extend_from_slice(b",\"error\":");
        let _ = serde_json::to_writer(&mut *out, e);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::{Point, Registry, Value};
    use crate::config::{Bytes, Dur, NorthBuffer};
    use crate::sinks::{buffer, SinkStats, Source};

    /// A buffer holding a backlog: a busy device (100 points per batch) and, every 50th batch, a
    /// quiet one (1 point).
    fn backlog() -> Arc<Shared> {
        let dir = crate::sinks::scratch_dir("outbox");
        let opts =
            NorthBuffer { max_bytes: Bytes(64 << 20), flush_interval: Dur::from_millis(10), ..NorthBuffer::default() };
        let (shared, dict) = buffer::open("t", &dir, &opts, Arc::new(SinkStats::default())).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let t = buffer::spawn("t", rx, vec![Source::parse("*/*").unwrap()], shared.clone(), dict);
        let r = Registry::default();
        let busy: Vec<_> = (0..100).map(|i| r.intern("busy", &format!("t{i}"))).collect();
        let quiet = r.intern("quiet", "t");
        for b in 0..2000i64 {
            let points = busy.iter().map(|k| Point::good(k.clone(), Value::Int(b), b)).collect();
            tx.blocking_send(crate::hub::batch(points)).unwrap();
            if b % 50 == 0 {
                tx.blocking_send(crate::hub::batch(vec![Point::good(quiet.clone(), Value::Int(b), b)])).unwrap();
            }
        }
        drop(tx);
        t.unwrap().join().unwrap();
        shared
    }

    #[test]
    fn a_quiet_device_leaves_on_time_while_a_backlog_drains() {
        let shared = backlog();
        let batch = NorthBatch { max_points: 500, max_wait: Some(Dur::from_millis(100)) };
        let mut outbox =
            Outbox::new(shared.clone(), "gw", &x_device(), &batch, Duration::from_secs(100 * 365 * 24 * 3600));
        let start = Instant::now();
        let (mut busy_sent, mut quiet_first) = (0, None);
        while busy_sent < 400 && start.elapsed() < Duration::from_secs(10) {
            let Some(m) = outbox.next_message() else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            if m.target == "x/quiet" {
                quiet_first.get_or_insert(busy_sent);
            } else {
                busy_sent += 1;
                // A link that takes a moment per message, so the drain outlasts max_wait.
                std::thread::sleep(Duration::from_millis(2));
            }
            outbox.done(m.token);
        }
        assert_eq!(busy_sent, 400, "the busy device's 200,000 points went in 400 full messages");
        let first = quiet_first.expect("the quiet device's message left");
        assert!(first < 200, "it left after its max_wait, not after the whole backlog (after {first} busy messages)");
        assert!(shared.ack_to.load(Ordering::Acquire) > 0, "records were acknowledged along the way");
    }

    /// Default batching: a poll's points leave as one message per device the moment its record is
    /// read, never waiting for the next poll; a poll larger than `max_points` is split.
    #[test]
    fn by_default_each_poll_leaves_at_once_as_its_own_message() {
        let dir = crate::sinks::scratch_dir("per-poll");
        let opts =
            NorthBuffer { max_bytes: Bytes(64 << 20), flush_interval: Dur::from_millis(10), ..NorthBuffer::default() };
        let (shared, dict) = buffer::open("t", &dir, &opts, Arc::new(SinkStats::default())).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let t = buffer::spawn("t", rx, vec![Source::parse("*/*").unwrap()], shared.clone(), dict).unwrap();
        let r = Registry::default();
        let a: Vec<_> = (0..3).map(|i| r.intern("a", &format!("t{i}"))).collect();
        let b: Vec<_> = (0..7).map(|i| r.intern("b", &format!("t{i}"))).collect();
        for poll in 0..2i64 {
            tx.blocking_send(crate::hub::batch(
                a.iter().map(|k| Point::good(k.clone(), Value::Int(poll), 0)).collect(),
            ))
            .unwrap();
            tx.blocking_send(crate::hub::batch(
                b.iter().map(|k| Point::good(k.clone(), Value::Int(poll), 0)).collect(),
            ))
            .unwrap();
        }
        drop(tx);
        t.join().unwrap();
        let batch = NorthBatch { max_points: 5, max_wait: None };
        let mut outbox = Outbox::new(shared, "gw", &x_device(), &batch, Duration::from_secs(3600 * 24 * 365));
        assert_eq!(outbox.deadline(), None, "nothing ever waits for a clock");
        let sent: Vec<(String, u64)> =
            std::iter::from_fn(|| outbox.next_message()).map(|m| (m.target, m.points)).collect();
        let want = |t: &str, n: u64| (t.to_owned(), n);
        assert_eq!(
            sent,
            [want("x/a", 3), want("x/b", 5), want("x/b", 2), want("x/a", 3), want("x/b", 5), want("x/b", 2)],
            "one message per device per poll, in poll order, split at max_points"
        );
    }

    #[test]
    fn a_record_dropped_at_the_cap_while_in_flight_is_counted_once() {
        let dir = crate::sinks::scratch_dir("inflight");
        let opts =
            NorthBuffer { max_bytes: Bytes(256 << 10), flush_interval: Dur::from_millis(10), ..NorthBuffer::default() };
        let stats = Arc::new(SinkStats::default());
        let (shared, dict) = buffer::open("t", &dir, &opts, stats.clone()).unwrap();
        let r = Registry::default();
        let keys: Vec<_> = (0..100).map(|i| r.intern("press", &format!("t{i}"))).collect();
        let feed = |dict, from: i64, to: i64| {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let t = buffer::spawn("t", rx, vec![Source::parse("*/*").unwrap()], shared.clone(), dict).unwrap();
            for b in from..to {
                let points = keys.iter().map(|k| Point::good(k.clone(), Value::Int(b), now_ms())).collect();
                tx.blocking_send(crate::hub::batch(points)).unwrap();
            }
            drop(tx);
            t.join().unwrap();
        };
        feed(dict, 0, 100);
        let batch = NorthBatch { max_points: 100, max_wait: Some(Dur::from_millis(0)) };
        let mut outbox = Outbox::new(shared.clone(), "gw", &x_device(), &batch, Duration::from_secs(3600 * 24 * 365));
        let in_flight: Vec<Message> = std::iter::from_fn(|| outbox.next_message()).take(50).collect();
        assert_eq!(in_flight.len(), 50);
        // More data than the cap holds: the oldest segments go, with the records in flight.
        feed(super::codec::Dict::open(&dir).unwrap(), 100, 2000);
        assert!(stats.dropped_full.get() > 0, "the cap was reached");
        for m in in_flight {
            outbox.done(m.token);
        }
        let store = shared.store();
        let counted = shared.counted_to.load(Ordering::Acquire);
        let remaining: u64 = store
            .read_from(store.acked(), usize::MAX)
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= counted)
            .map(|(_, r)| codec::count(r))
            .sum();
        assert_eq!(stats.accepted.get(), 2000 * 100);
        assert_eq!(
            stats.delivered.get() + stats.dropped_full.get() + remaining,
            stats.accepted.get(),
            "every point is delivered, dropped or still buffered, and counted once"
        );
    }

    /// Buffers 10 batches of 10 points stamped `ts` and returns how many were sent and expired by
    /// an outbox opened after `reopen` ran on the buffer's folder.
    fn age(ts: i64, max_age: Duration, reopen: impl FnOnce(&std::path::Path)) -> (u64, u64) {
        let dir = crate::sinks::scratch_dir("age");
        let opts = NorthBuffer { flush_interval: Dur::from_millis(10), ..NorthBuffer::default() };
        let stats = Arc::new(SinkStats::default());
        let (shared, dict) = buffer::open("t", &dir, &opts, stats.clone()).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let t = buffer::spawn("t", rx, vec![Source::parse("*/*").unwrap()], shared.clone(), dict).unwrap();
        let r = Registry::default();
        let keys: Vec<_> = (0..10).map(|i| r.intern("d", &format!("t{i}"))).collect();
        for b in 0..10 {
            let points = keys.iter().map(|k| Point::good(k.clone(), Value::Int(b), ts)).collect();
            tx.blocking_send(crate::hub::batch(points)).unwrap();
        }
        drop(tx);
        t.join().unwrap();
        drop(shared);
        reopen(&dir);
        let stats = Arc::new(SinkStats::default());
        let (shared, _dict) = buffer::open("t", &dir, &opts, stats.clone()).unwrap();
        let batch = NorthBatch { max_points: 1000, max_wait: Some(Dur::from_millis(0)) };
        let mut outbox = Outbox::new(shared, "gw", &x_device(), &batch, max_age);
        while let Some(m) = outbox.next_message() {
            outbox.done(m.token);
        }
        (stats.delivered.get(), stats.dropped_expired.get())
    }

    #[test]
    fn max_age_is_measured_from_buffering_not_from_the_device_clock() {
        let hour = Duration::from_secs(3600);
        // A PC that booted in 1970: its points are stamped then, but were buffered just now.
        assert_eq!(age(1_000, hour, |_| {}), (100, 0), "a backlog stamped in 1970 is not dropped");
        // Points stamped ten years ahead, buffered two hours (of buffer time) ago, still expire.
        let future = now_ms() + 10 * 365 * 24 * 3600 * 1000;
        let two_hours_on = |dir: &std::path::Path| {
            buffer::write_clock(dir, now_ms() + 2 * 3600 * 1000, now_ms()).unwrap();
        };
        assert_eq!(age(future, hour, two_hours_on), (0, 100), "future-stamped points expire by buffer time");
        // A wall clock that jumped years ahead between runs does not age the backlog.
        let clock_jumped = |dir: &std::path::Path| {
            buffer::write_clock(dir, now_ms(), now_ms() - 20 * 365 * 24 * 3600 * 1000).unwrap();
        };
        assert_eq!(age(now_ms(), hour, clock_jumped), (100, 0), "an implausible downtime does not count");
    }

    fn x_device() -> Template {
        Template::parse("x/{device}", crate::base::topic::ALL).unwrap()
    }
}
