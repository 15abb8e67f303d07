//! Northbound sinks: the disk store behind store-and-forward (the cloud MQTT and HTTP sinks are
//! next).

pub mod store;
