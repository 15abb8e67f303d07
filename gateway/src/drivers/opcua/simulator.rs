//! The built-in OPC-UA simulator: an async-opcua server whose variables follow waveforms.
//!
//! It gives the demo an OPC-UA machine and the tests a server they can stop and restart. Its
//! variables live in their own namespace as `ns=<index>;s=<name>` (index 2 on this server) under
//! a folder named after the simulator, so `updraft opcua browse` finds them as it would on a PLC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opcua::crypto::SecurityPolicy;
use opcua::types::{
    BuildInfo, DataValue, DateTime, MessageSecurityMode, NodeId, ObjectId, StatusCode, TimestampsToReturn, VariableId,
    Variant,
};
use opcua_server::address_space::Variable;
use opcua_server::diagnostics::{DiagnosticsNodeManagerBuilder, NamespaceMetadata};
use opcua_server::node_manager::memory::{simple_node_manager, InMemoryNodeManagerBuilder, SimpleNodeManager};
use opcua_server::{ServerBuilder, ServerEndpoint, ServerHandle, ServerUserToken, ANONYMOUS_USER_TOKEN_ID};
use tokio::net::TcpListener;
use tokio::time::{self, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::config::{OpcuaSimulator, SimType, SimVariable};
use crate::drivers::wave::{Shape, Wave};

/// A running simulator: its address, and a hand on its variables (for tests and the demo).
pub struct Started {
    pub addr: SocketAddr,
    /// The namespace index of its variables.
    pub namespace: u16,
    handle: ServerHandle,
    manager: Arc<SimpleNodeManager>,
}

impl Started {
    /// The NodeId of a variable.
    pub fn node(&self, name: &str) -> NodeId {
        NodeId::new(self.namespace, name.to_owned())
    }

    /// Sets a variable as if the device changed it at `source` (its source timestamp).
    pub fn set(&self, name: &str, value: Variant, source: DateTime) -> Result<(), StatusCode> {
        let dv = DataValue {
            value: Some(value),
            status: Some(StatusCode::Good),
            source_timestamp: Some(source),
            server_timestamp: Some(DateTime::now()),
            ..Default::default()
        };
        self.manager.set_value(self.handle.subscriptions(), &self.node(name), None, dv)
    }

    /// A variable's current value.
    pub fn get(&self, name: &str) -> Option<Variant> {
        let space = self.manager.address_space().read();
        match space.find(&self.node(name))? {
            opcua_server::address_space::NodeType::Variable(v) => {
                v.value(TimestampsToReturn::Neither, &Default::default(), &Default::default(), 0.0).value
            }
            _ => None,
        }
    }

    /// Sessions open now, and sessions created since start.
    pub fn sessions(&self) -> (u32, u32) {
        let d = &self.handle.info().diagnostics;
        let count = |id| match d.get(id).and_then(|v| v.value) {
            Some(Variant::UInt32(n)) => n,
            _ => 0,
        };
        (
            count(VariableId::Server_ServerDiagnostics_ServerDiagnosticsSummary_CurrentSessionCount),
            count(VariableId::Server_ServerDiagnostics_ServerDiagnosticsSummary_CumulatedSessionCount),
        )
    }
}

/// Starts the simulator and serves until `cancel`. Returns its bound address.
pub async fn start(name: &str, cfg: &OpcuaSimulator, cancel: CancellationToken) -> std::io::Result<Started> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("simulator `{name}` cannot listen on {}: {e}", cfg.listen))
    })?;
    let addr = listener.local_addr()?;
    let pki = cfg.pki_dir.clone().unwrap_or_else(|| default_pki(name));
    let mut tokens = vec![ANONYMOUS_USER_TOKEN_ID.to_owned()];
    tokens.extend(cfg.users.iter().map(|u| format!("user-{}", u.name)));
    let mut builder = ServerBuilder::new()
        .application_name(format!("Updraft simulator {name}"))
        .application_uri(format!("urn:updraft:simulator:{name}"))
        .product_uri("urn:updraft:simulator")
        // What generic clients show as the server's identity (Server/ServerStatus/BuildInfo).
        .build_info(BuildInfo {
            product_uri: "urn:updraft:simulator".into(),
            manufacturer_name: "Updraft".into(),
            product_name: "Updraft OPC-UA simulator".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            build_number: env!("CARGO_PKG_VERSION").into(),
            build_date: DateTime::now(),
        })
        .host(addr.ip().to_string())
        .port(addr.port())
        .pki_dir(pki)
        // Always a certificate: async-opcua logs an error for a server without one, even when
        // all its endpoints are unsecured, and the key generation happens once per pki folder.
        .create_sample_keypair(true)
        // Clients are trusted: a simulator is for commissioning, not a security boundary.
        .trust_client_certs(true)
        .token(cancel.clone())
        // Session and subscription counts, readable by any client under Server/ServerDiagnostics.
        .diagnostics_enabled(true)
        .add_endpoint("none", ServerEndpoint::new_none("/", &tokens))
        .default_endpoint("none")
        .discovery_urls(vec!["/".to_owned()])
        // Our own small ns=0 instead of async-opcua's generated one (see ns0.rs); the diagnostics
        // manager serves ns=1 (the server's own namespace), so the simulator's variables are ns=2.
        .without_node_managers()
        .with_node_manager(InMemoryNodeManagerBuilder::new(super::ns0::Ns0Builder))
        .with_node_manager(DiagnosticsNodeManagerBuilder)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata { namespace_uri: cfg.namespace.clone(), ..Default::default() },
            "simulator",
        ));
    if cfg.secure {
        for (id, policy, mode) in [
            ("basic256sha256-sign", SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign),
            ("basic256sha256-encrypt", SecurityPolicy::Basic256Sha256, MessageSecurityMode::SignAndEncrypt),
            ("aes128-encrypt", SecurityPolicy::Aes128Sha256RsaOaep, MessageSecurityMode::SignAndEncrypt),
            ("aes256-encrypt", SecurityPolicy::Aes256Sha256RsaPss, MessageSecurityMode::SignAndEncrypt),
        ] {
            builder = builder.add_endpoint(id, ServerEndpoint::new("/", policy, mode, &tokens));
        }
    }
    for u in &cfg.users {
        let token = match (&u.password, &u.certificate) {
            (Some(p), _) => ServerUserToken::user_pass(u.name.as_str(), p.as_str()),
            (None, Some(cert)) => ServerUserToken::x509(u.name.as_str(), cert),
            (None, None) => continue,
        };
        builder = builder.add_user_token(format!("user-{}", u.name), token);
    }

    let (server, handle) = builder.build().map_err(|e| std::io::Error::other(format!("simulator `{name}`: {e}")))?;
    let namespace = handle
        .get_namespace_index(&cfg.namespace)
        .ok_or_else(|| std::io::Error::other(format!("simulator `{name}`: namespace not registered")))?;
    let manager = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .ok_or_else(|| std::io::Error::other(format!("simulator `{name}`: no node manager")))?;

    let folder = NodeId::new(namespace, name.to_owned());
    let ids: Vec<NodeId> = cfg.variables.iter().map(|v| NodeId::new(namespace, v.name.clone())).collect();
    let shapes: Vec<Shape> = cfg.variables.iter().map(SimVariable::shape).collect();
    let mut walks: Vec<f64> = shapes.iter().map(Shape::start).collect();
    {
        let mut space = manager.address_space().write();
        space.add_folder(&folder, name, name, &ObjectId::ObjectsFolder.into());
        let variables = cfg
            .variables
            .iter()
            .zip(&ids)
            .zip(&walks)
            .map(|((v, id), start)| {
                let mut var = Variable::new(id, v.name.as_str(), v.name.as_str(), variant(v, *start));
                var.set_writable(v.writable);
                var.set_user_access_level(var.access_level());
                var
            })
            .collect();
        space.add_variables(variables, &folder);
    }

    let span = tracing::info_span!("simulator", simulator = %name);
    let variables = cfg.variables.clone();
    let update = cfg.update.0;
    let subscriptions = handle.subscriptions().clone();
    let c = cancel.clone();
    let updater = manager.clone();
    if variables.iter().any(|v| v.wave != Wave::Constant) {
        tokio::spawn(
            async move {
                let start = Instant::now();
                let mut tick = time::interval(update.max(Duration::from_millis(1)));
                tick.set_missed_tick_behavior(time::MissedTickBehavior::Skip);
                while c.run_until_cancelled(tick.tick()).await.is_some() {
                    let t = start.elapsed().as_secs_f64();
                    let now = DateTime::now();
                    let changes: Vec<(&NodeId, Option<&_>, DataValue)> = variables
                        .iter()
                        .zip(&shapes)
                        .zip(walks.iter_mut())
                        .zip(&ids)
                        .filter(|(((v, _), _), _)| v.wave != Wave::Constant)
                        .map(|(((v, shape), walk), id)| {
                            let value = DataValue::new_at(variant(v, shape.at(t, walk)), now);
                            (id, None, value)
                        })
                        .collect();
                    if let Err(e) = updater.set_values(&subscriptions, changes.into_iter()) {
                        warn!(error = %e, "Simulator could not update its variables.");
                    }
                }
            }
            .instrument(span.clone()),
        );
    }
    let server_span = span.clone();
    tokio::spawn(
        async move {
            if let Err(e) = server.run_with(listener).await {
                warn!(error = %e, "OPC-UA simulator stopped.");
            }
        }
        .instrument(server_span),
    );
    info!(parent: &span, %addr, namespace, variables = cfg.variables.len(), "OPC-UA simulator listening.");
    Ok(Started { addr, namespace, handle, manager })
}

/// A simulated value as the variable's type (numbers rounded and clamped into integer types).
fn variant(v: &SimVariable, x: f64) -> Variant {
    match v.data_type {
        SimType::Bool => Variant::Boolean(x >= 0.5),
        SimType::I16 => Variant::Int16(x.round().clamp(i16::MIN.into(), i16::MAX.into()) as i16),
        SimType::I32 => Variant::Int32(x.round().clamp(i32::MIN.into(), i32::MAX.into()) as i32),
        SimType::I64 => Variant::Int64(x.round() as i64),
        SimType::U16 => Variant::UInt16(x.round().clamp(0.0, u16::MAX.into()) as u16),
        SimType::U32 => Variant::UInt32(x.round().clamp(0.0, u32::MAX.into()) as u32),
        SimType::U64 => Variant::UInt64(x.round().max(0.0) as u64),
        SimType::F32 => Variant::Float(x as f32),
        SimType::F64 => Variant::Double(x),
        SimType::String => Variant::from(v.text.clone().unwrap_or_else(|| format!("{x}"))),
    }
}

/// Where a secure simulator keeps its certificate by default.
pub fn default_pki(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("updraft-sim-{name}-pki"))
}
