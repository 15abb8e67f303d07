//! Southbound drivers: each turns a device's protocol into `Point`s on the internal bus.

pub mod modbus;
