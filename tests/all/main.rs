//! The black-box test binary: every test drives a real gateway over real loopback sockets.

mod asyncua;
mod broker;
mod conformance;
mod dashboard;
mod fuzz;
mod modbus;
mod north;
mod opcua;
mod ops;
mod plugins;
mod pymodbus;
mod reload;
mod security;
