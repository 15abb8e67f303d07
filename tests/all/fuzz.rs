//! Fuzzing the parsers that meet untrusted input: the config loader (what an operator types), the
//! Modbus value codec (what a device answers), the buffer's record decoder (what a damaged disk
//! returns) and the write-command parsers (what anyone on the broker or the cloud sends).
//!
//! Each target mutates the seeds in `tests/fuzz/{target}/` (and fully random bytes) for a fixed
//! budget — `UPDRAFT_FUZZ_SECONDS` each, 3 by default, 30 in CI — with proptest, which catches a
//! panic, shrinks the input to a small one and saves its seed to `tests/fuzz/regressions/`, where
//! every later run tries it first. Zero panics is the bar. (cargo-fuzz would need a nightly
//! toolchain and libFuzzer's C++ build; proptest runs on the stable toolchain CI already has.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};

fn dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(rel)
}

fn budget() -> Duration {
    let secs = std::env::var("UPDRAFT_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// The seed inputs of a target: every file in its corpus folder, plus `extra`.
fn seeds(target: &str, extra: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut out = extra;
    if let Ok(entries) = std::fs::read_dir(dir(target)) {
        for e in entries.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push(b);
            }
        }
    }
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Copies a run of the input elsewhere (repeats fields, lengths, lines).
    Repeat(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), prop_oneof![any::<u8>(), Just(0u8), Just(0xFF), Just(b'"'), Just(b'\n'), Just(b'[')])
            .prop_map(|(p, b)| Edit::Set(p, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Edit::Insert(p, b)),
        (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Delete(p, n)),
        (any::<usize>(), 1usize..64, any::<usize>()).prop_map(|(p, n, to)| Edit::Repeat(p, n, to)),
    ]
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = b.len();
        let at = |p: usize| if len == 0 { 0 } else { p % (len + 1) };
        match e {
            Edit::Flip(p, bit) if len > 0 => b[p % len] ^= 1 << bit,
            Edit::Set(p, v) if len > 0 => b[p % len] = *v,
            Edit::Insert(p, v) => {
                let i = at(*p);
                b.splice(i..i, v.iter().copied());
            }
            Edit::Delete(p, n) if len > 0 => {
                let i = p % len;
                b.drain(i..(i + n).min(len));
            }
            Edit::Repeat(p, n, to) if len > 0 => {
                let i = p % len;
                let run: Vec<u8> = b[i..(i + n).min(len)].to_vec();
                let j = at(*to);
                b.splice(j..j, run);
            }
            _ => {}
        }
    }
    b.truncate(1 << 16);
    b
}

/// Mutated seeds, or fully random bytes one time in eight.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        7 => (0..n, prop::collection::vec(edit(), 0..12)).prop_map(move |(i, edits)| apply(seeds[i].clone(), &edits)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

/// Runs `target` on generated inputs for the budget; a panic fails the test with a shrunk input.
fn fuzz(name: &str, strategy: impl Strategy<Value = Vec<u8>>, target: impl Fn(&[u8])) {
    let persistence: &'static str =
        Box::leak(dir(&format!("regressions/{name}.txt")).to_string_lossy().into_owned().into_boxed_str());
    let started = Instant::now();
    let ran = std::cell::Cell::new(0u64);
    while ran.get() == 0 || started.elapsed() < budget() {
        // A fresh runner (and random seed) per round: a runner counts its cases once.
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(persistence))),
            source_file: Some(file!()),
            ..Config::default()
        });
        let result = runner.run(&strategy, |input| {
            ran.set(ran.get() + 1);
            target(&input);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
    }
    println!("fuzz {name}: {} inputs in {:.1}s, no panic", ran.get(), started.elapsed().as_secs_f64());
}

#[test]
fn fuzz_the_config_loader() {
    let shipped = ["gateway.toml", "demo.toml"]
        .iter()
        .map(|f| std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs").join(f)).unwrap())
        .collect();
    fuzz("config", inputs(seeds("config", shipped)), |input| {
        let text = String::from_utf8_lossy(input);
        // Relative paths inside resolve against a folder that does not exist.
        let _ = updraft::config::parse(&text, Path::new("/nonexistent/fuzz.toml"));
    });
}

#[test]
fn fuzz_the_modbus_value_codec() {
    use updraft::base::point::Value;
    use updraft::drivers::modbus::codec::{decode, encode, ByteOrder, DataType};
    let types = [
        DataType::Bool,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::F32,
        DataType::U64,
        DataType::I64,
        DataType::F64,
    ];
    let orders = [ByteOrder::ABCD, ByteOrder::CDAB, ByteOrder::BADC, ByteOrder::DCBA];
    fuzz("modbus", inputs(seeds("modbus", vec![vec![0; 10], vec![0xFF; 10]])), |input| {
        let (Some(t), Some(o)) = (input.first(), input.get(1)) else { return };
        let (ty, order) = (types[*t as usize % types.len()], orders[*o as usize % orders.len()]);
        let regs: Vec<u16> =
            input[2..].chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
        // Text: any registers decode (never panic); what fits is written back and reads the same.
        let text_order = if *o % 2 == 0 { ByteOrder::ABCD } else { ByteOrder::BADC };
        if let Value::String(t) = updraft::drivers::modbus::codec::decode_string(text_order, &regs) {
            let n = u16::try_from(regs.len()).unwrap_or(u16::MAX);
            if let Ok(words) = updraft::drivers::modbus::codec::encode_string(text_order, &t, n) {
                let again = updraft::drivers::modbus::codec::decode_string(text_order, &words);
                assert_eq!(again, Value::String(t.clone()), "{regs:?}");
            }
        }
        // A device's answer: any registers, any length.
        if let Some(v) = decode(ty, order, &regs) {
            // What was read can be written back to the same place.
            let back = encode(ty, order, v);
            assert!(back.is_ok() || matches!(ty, DataType::F32 | DataType::F64), "{ty:?} {order:?} {regs:?}");
        }
        // A write command's value: any number.
        let mut f = [0u8; 8];
        for (i, b) in input.iter().skip(2).take(8).enumerate() {
            f[i] = *b;
        }
        for v in
            [Value::Float(f64::from_le_bytes(f)), Value::Int(i64::from_le_bytes(f)), Value::UInt(u64::from_le_bytes(f))]
        {
            let _ = encode(ty, order, v);
        }
    });
}

#[test]
fn fuzz_the_buffer_record_decoder() {
    use updraft::base::point::{Point, Registry, Value};
    // Valid records of every kind, to mutate.
    let tmp = updraft_tests::TempDir::new("fuzz-dict");
    let mut dict = updraft::sinks::codec::Dict::open(tmp.path()).unwrap();
    let r = Registry::default();
    let k = r.intern("boiler-1", "temperature");
    let m = r.intern_at("boiler-1", "raw", "updraft/derived/boiler-1/raw", true);
    let points = [
        Point::good(k.clone(), Value::Float(21.7), 1_732_860_000_123),
        Point::good(k.clone(), Value::Float(std::f64::consts::E), 1_732_860_000_124),
        Point::good(k.clone(), Value::F32(0.1), 1_732_860_000_200),
        Point::good(k.clone(), Value::Int(-5), 1),
        Point::good(k.clone(), Value::UInt(u64::MAX), 2),
        Point::good(k.clone(), Value::Bool(true), 3),
        Point::good(k.clone(), Value::String("PUMP-A7 蓝".into()), 3),
        Point::bad(k.clone(), "timeout after 1s".into(), 4),
        Point::message(m, b"{\"raw\":1}".to_vec().into(), 5),
    ];
    let mut valid = Vec::new();
    for n in 1..=points.len() {
        let mut out = Vec::new();
        updraft::sinks::codec::encode(&mut dict, points[..n].iter(), 1_732_860_000_500, &mut out);
        valid.push(out);
    }
    fuzz("record", inputs(seeds("record", valid)), |input| {
        if let Some((points, _)) = updraft::sinks::codec::decode_record(input) {
            assert!(points.len() as u64 == updraft::sinks::codec::count(input));
        }
    });
}

#[test]
fn fuzz_the_write_command_parsers() {
    let route = updraft::commands::Route::new("parks/gw/{device}/set");
    let extra = vec![
        br#"{"device":"press","tag":"setpoint","value":42,"id":"c1"}"#.to_vec(),
        br#"{"value": 1.5, "id": 7}"#.to_vec(),
        b"true".to_vec(),
    ];
    fuzz("command", inputs(seeds("command", extra)), |input| {
        // The first byte picks where the topic ends, so topics are fuzzed too.
        let cut = input.first().map_or(0, |b| usize::from(*b) % (input.len().max(1)));
        let (topic, payload) = input.split_at(cut.min(input.len()));
        let topic = String::from_utf8_lossy(topic);
        let _ = route.parse(&format!("parks/gw/{topic}/set"), payload);
        let _ = updraft::commands::parse_local(&format!("updraft/{topic}/set"), payload);
        let _ = updraft::commands::parse_local(&topic, payload);
    });
}
