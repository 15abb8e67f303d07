//! Waveforms for the built-in simulators (Modbus and OPC-UA): what a simulated value does over time.

use std::time::Duration;

use serde::Deserialize;

/// `wave` of a simulated register or variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wave {
    Constant,
    Ramp,
    Sine,
    Square,
    RandomWalk,
}

/// One waveform with its parameters.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub wave: Wave,
    /// The value of a `constant` (and the start of a `random-walk`).
    pub value: f64,
    pub min: f64,
    pub max: f64,
    /// Period of `ramp`, `sine` and `square`.
    pub period: Duration,
    /// Largest change per update of a `random-walk`.
    pub step: f64,
}

impl Shape {
    /// The first value, before any update.
    pub fn start(&self) -> f64 {
        match self.wave {
            Wave::RandomWalk => self.value.clamp(self.min, self.max),
            _ => self.at(0.0, &mut self.value.clamp(self.min, self.max)),
        }
    }

    /// The value `t` seconds after start; `walk` carries a random walk's position.
    pub fn at(&self, t: f64, walk: &mut f64) -> f64 {
        let period = self.period.as_secs_f64().max(1e-3);
        let phase = (t / period).fract();
        match self.wave {
            Wave::Constant => self.value,
            Wave::Ramp => self.min + (self.max - self.min) * phase,
            Wave::Sine => {
                let mid = (self.min + self.max) / 2.0;
                mid + (self.max - self.min) / 2.0 * (std::f64::consts::TAU * phase).sin()
            }
            Wave::Square => {
                if phase < 0.5 {
                    self.max
                } else {
                    self.min
                }
            }
            Wave::RandomWalk => {
                *walk = (*walk + self.step * (2.0 * fastrand::f64() - 1.0)).clamp(self.min, self.max);
                *walk
            }
        }
    }
}

/// Defaults of the simulators' waveform keys.
pub const fn default_wave() -> Wave {
    Wave::Constant
}
pub const fn default_max() -> f64 {
    100.0
}
pub const fn default_period() -> crate::config::Dur {
    crate::config::Dur::from_millis(60_000)
}
pub const fn default_step() -> f64 {
    1.0
}
pub const fn default_update() -> crate::config::Dur {
    crate::config::Dur::from_millis(100)
}
