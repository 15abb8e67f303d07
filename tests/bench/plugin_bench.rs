//! Plugin benchmark: per-call overhead and points/s through a trivial plugin (`plugins/testing/noop`)
//! for batches of 1, 100 and 1000 points, and plugin load time cold (compile) and warm (cached).
//! Uses the gateway's own host code. Run with `bash tests/bench/plugins.sh`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use updraft::base::point::Registry;
use updraft::plugins::host::{Batch, DataPoint, PluginEngine, WitQuality, WitValue};

fn main() {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release/noop.wasm");
    assert!(wasm.exists(), "{} is missing: build plugins/ first", wasm.display());
    let cache = std::env::temp_dir().join(format!("updraft-plugin-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);

    let engine = PluginEngine::new(&cache).unwrap();
    let cold = engine.load(&wasm).unwrap();
    assert!(!cold.warm);
    let mut warm_times = Vec::new();
    for _ in 0..20 {
        // A fresh engine each time, as after a gateway restart.
        let engine = PluginEngine::new(&cache).unwrap();
        let warm = engine.load(&wasm).unwrap();
        assert!(warm.warm);
        warm_times.push(warm.load_time);
    }
    warm_times.sort();
    let registry = Arc::new(Registry::default());
    let tags = updraft::plugins::host::TagView { registry: registry.clone(), subscribe: Arc::from(["*/*".to_owned()]) };
    let t = Instant::now();
    let mut inst = cold.instantiate("bench", "{}", 32 << 20, Duration::from_millis(500), tags.clone(), None).unwrap();
    let instantiate = t.elapsed();
    println!("updraft plugin benchmark (plugins/testing/noop, gateway host code)");
    println!("  load cold (compile + cache)   {:>10.1} ms", cold.load_time.as_secs_f64() * 1e3);
    println!(
        "  load warm (from cache) median {:>10.2} ms  (min {:.2} ms)",
        warm_times[10].as_secs_f64() * 1e3,
        warm_times[0].as_secs_f64() * 1e3
    );
    println!("  instantiate + init            {:>10.2} ms", instantiate.as_secs_f64() * 1e3);

    let tags: Vec<u32> = (0..100).map(|i| registry.intern("bench-dev", &format!("t{i}")).id).collect();
    for size in [1usize, 100, 1000] {
        let points: Vec<DataPoint> = (0..size)
            .map(|i| DataPoint {
                tag: tags[i % tags.len()],
                value: Some(WitValue::Float(i as f64)),
                quality: WitQuality::Good,
                ts: 1,
            })
            .collect();
        let batch = Batch { seq: 0, points };
        // Warm up: the SDK resolves each tag's names once.
        for _ in 0..100 {
            inst.on_batch(&batch, 1).unwrap();
        }
        let target = Duration::from_secs(2);
        let start = Instant::now();
        let mut calls = 0u64;
        while start.elapsed() < target {
            for _ in 0..50 {
                inst.on_batch(&batch, 1).unwrap();
            }
            calls += 50;
        }
        let secs = start.elapsed().as_secs_f64();
        let per_call = secs / calls as f64;
        println!(
            "  batch {size:>4}: {:>9.2} µs per call, {:>7.1} ns per point, {:>11.0} points/s",
            per_call * 1e6,
            per_call * 1e9 / size as f64,
            (calls as f64 * size as f64) / secs
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}
