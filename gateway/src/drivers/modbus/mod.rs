//! Modbus: the register codec, the read planner, the TCP polling driver, its config and its
//! simulator.

pub mod codec;
pub mod commission;
pub mod config;
mod driver;
pub mod planner;
pub mod simulator;
pub mod trace;

pub use config::{ModbusSimulator, ModbusTag, ModbusTcpDevice, SimRegister, Wave, WriteFunction};
pub use driver::ModbusTcpDriver;
