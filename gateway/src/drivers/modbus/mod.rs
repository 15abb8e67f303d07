//! Modbus: the register codec, the read planner and the TCP polling driver.

pub mod codec;
mod driver;
pub mod planner;

pub use driver::ModbusTcpDriver;
