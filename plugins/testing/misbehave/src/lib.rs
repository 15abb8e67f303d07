//! Test fixture, not an example: misbehaves on command so the gateway's sandbox can be tested.
//! Each point's value selects the behaviour: 1 loops forever, 2 allocates until memory runs out,
//! 3 panics, 4 tries to read a file and 5 to open a socket (and reports whether it could: 1 yes,
//! 0 no, on tag `escape`), 6 sleeps for an hour, 7 emits 5,000 new tag names (more each call),
//! 8 emits on a tag named `set`, 9 emits a tag name of 200 bytes, 10 reports on tag `visible` how
//! many of the tag ids 0..1000 `tags.describe` answers for, 11 leaks WASI resources until the host
//! refuses; any other value is passed through unchanged.

use serde::Deserialize;
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
struct Config {
    /// Address the socket attempt targets (a loopback port of the test).
    #[serde(default)]
    connect_to: String,
}

struct Misbehave {
    connect_to: String,
    /// Tag names made up so far (mode 7).
    made_up: u64,
}

impl Plugin for Misbehave {
    type Config = Config;

    fn init(cfg: Config) -> Result<Self, Error> {
        Ok(Misbehave { connect_to: cfg.connect_to, made_up: 0 })
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            match p.number().map(|v| v as i64) {
                Some(1) => {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                Some(2) => {
                    // Reserved, not filled: growing the memory is what the limit stops, and
                    // filling it would make a slow machine hit the call's deadline first.
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(Vec::with_capacity(4 << 20));
                        std::hint::black_box(&hoard);
                    }
                }
                Some(3) => panic!("misbehave fixture panicked on purpose"),
                Some(4) => {
                    let escaped = std::fs::read("/etc/hostname").is_ok() || std::fs::read_dir("/").is_ok();
                    out.point(p.device(), "escape", Value::Int(i64::from(escaped)), p.ts);
                }
                Some(5) => {
                    let escaped = std::net::TcpStream::connect(self.connect_to.as_str()).is_ok();
                    out.point(p.device(), "escape", Value::Int(i64::from(escaped)), p.ts);
                }
                Some(6) => std::thread::sleep(std::time::Duration::from_secs(3600)),
                Some(7) => {
                    for _ in 0..5_000 {
                        self.made_up += 1;
                        out.point(p.device(), &format!("t{}", self.made_up), Value::Int(1), p.ts);
                    }
                }
                Some(8) => out.point(p.device(), "set", Value::Int(1), p.ts),
                Some(9) => out.point(p.device(), &"x".repeat(200), Value::Int(1), p.ts),
                Some(10) => {
                    let visible = (0..1000)
                        .filter(|id| updraft_plugin_sdk::bindings::updraft::plugin::tags::describe(*id).is_some())
                        .count();
                    out.point(p.device(), "visible", Value::Int(visible as i64), p.ts);
                }
                Some(11) => loop {
                    std::mem::forget(wasip2::clocks::monotonic_clock::subscribe_duration(1));
                },
                _ => out.forward(p),
            }
        }
        Ok(())
    }
}

export!(Misbehave);
