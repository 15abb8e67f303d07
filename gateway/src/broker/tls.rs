//! MQTT over TLS for the embedded broker: a TLS front that terminates each connection with rustls
//! and hands the plain MQTT stream to rumqttd's own listener on loopback.
//!
//! Why a front rather than rumqttd's built-in TLS: rumqttd 0.20 brings its own rustls 0.22 and
//! webpki, a second copy of the heaviest crates in the build next to the rustls 0.23 the cloud
//! sinks use. The front costs one in-process copy per byte and keeps one TLS stack, with the same
//! `ring` provider, for everything. Authentication (users) is still rumqttd's, on the MQTT CONNECT
//! that passes through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::BrokerTls;

/// Longest a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the server settings; an error names the key of the file at fault.
pub fn server_config(t: &BrokerTls) -> Result<ServerConfig, (&'static str, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("cert_file", format!("cannot read {}: {e}", t.cert_file.display())))?;
    if chain.is_empty() {
        return Err(("cert_file", format!("{} holds no PEM certificate", t.cert_file.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| ("key_file", format!("cannot read a PEM private key from {}: {e}", t.key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert_file", e.to_string()))?;
    let builder = match &t.ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .map_err(|e| ("ca_file", format!("cannot read {}: {e}", ca.display())))?;
            for cert in certs {
                let cert = cert.map_err(|e| ("ca_file", format!("{}: {e}", ca.display())))?;
                roots.add(cert).map_err(|e| ("ca_file", format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(("ca_file", format!("{} holds no PEM certificate", ca.display())));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ("ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| ("key_file", format!("the key in {} does not fit the certificate: {e}", t.key_file.display())))
}

/// Binds the TLS listener (a taken port is a start-up error, not a log line).
/// The accept queue is deep (the kernel caps it at `net.core.somaxconn`): std asks for 128, and
/// when thousands of clients reconnect at once after an outage, a full queue makes the kernel drop
/// handshakes that the clients retry only after seconds of SYN back-off.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(8192)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Serves TLS connections on `listener`, each piped to the plain MQTT listener at `upstream`.
pub fn spawn(
    listener: std::net::TcpListener,
    config: ServerConfig,
    upstream: SocketAddr,
    max_connections: usize,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let slots = Arc::new(Semaphore::new(max_connections));
    info!(%addr, "Embedded MQTT broker listening with TLS.");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "TLS accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = cancel.cancelled() => break,
            };
            // Over the connection limit the socket is simply closed, as rumqttd does.
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = pipe(acceptor, stream, upstream).await {
                    debug!(%peer, error = %e, "TLS connection ended.");
                }
            });
        }
    });
    Ok(addr)
}

async fn pipe(acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let mut plain = TcpStream::connect(upstream).await?;
    plain.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut tls, &mut plain).await?;
    Ok(())
}
