//! Test fixture, not an example: misbehaves on command so the gateway's sandbox can be tested.
//! Each point's value selects the behaviour: 1 loops forever, 2 allocates until memory runs out,
//! 3 panics, 4 tries to read a file and 5 to open a socket (and reports whether it could: 1 yes,
//! 0 no, on tag `escape`); any other value is passed through unchanged.

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
}

impl Plugin for Misbehave {
    type Config = Config;

    fn init(cfg: Config) -> Result<Self, Error> {
        Ok(Misbehave { connect_to: cfg.connect_to })
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
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![7u8; 1 << 20]);
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
                _ => out.forward(p),
            }
        }
        Ok(())
    }
}

export!(Misbehave);
