//! Modbus: the register codec, the read planner, the device driver (plan, decode, encode,
//! schedule), the links it talks through (TCP, RTU over TCP, serial RTU, one task per physical
//! link), its config and its simulator.

pub mod codec;
pub mod commission;
pub mod config;
mod driver;
pub mod link;
pub mod planner;
pub mod simulator;
pub mod trace;

pub use config::{ModbusDevice, ModbusSimulator, ModbusTag, SimRegister, Wave, WriteFunction};
pub use driver::ModbusDriver;
pub use link::Links;
