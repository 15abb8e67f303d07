//! The black-box test binary: every test drives a real gateway over real loopback sockets.

mod broker;
mod fuzz;
mod modbus;
mod north;
mod plugins;
mod pymodbus;
mod security;
