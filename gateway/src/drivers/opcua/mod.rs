//! The OPC-UA driver (`driver = "opcua"`) on async-opcua: subscriptions or polling, recovery with
//! a data-flow watchdog, security with a certificate trust list, writes, browsing, and the
//! built-in simulator (`kind = "opcua"`).

pub mod browse;
pub mod config;
pub mod convert;
pub mod driver;
mod ns0;
pub mod pki;
pub mod simulator;

use std::path::PathBuf;
use std::sync::Mutex;

pub use config::{OpcuaDevice, OpcuaSimulator};
pub use driver::OpcuaDriver;

/// Serializes the creation of the gateway's application certificate: several devices may start
/// at once, and only one may write the files.
pub(crate) static CERT_LOCK: Mutex<()> = Mutex::new(());

/// What every OPC-UA device of one gateway shares: its identity as an OPC-UA application.
#[derive(Debug, Clone)]
pub struct Context {
    /// `DATA_DIR/pki`: `own/cert.der`, `private/private.pem`, `trusted/`, `rejected/`.
    pub pki_dir: PathBuf,
    /// `urn:updraft:GATEWAY_ID`, also in the certificate's subject alternative name, as servers
    /// check.
    pub application_uri: String,
    pub application_name: String,
}

impl Context {
    pub fn new(data_dir: &std::path::Path, gateway_id: &str) -> Self {
        Context {
            pki_dir: data_dir.join("pki"),
            application_uri: format!("urn:updraft:{gateway_id}"),
            application_name: format!("Updraft {gateway_id}"),
        }
    }
}
