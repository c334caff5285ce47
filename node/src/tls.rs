//! Mutual TLS for replication links, and the quinn endpoints that use it.
//!
//! Both directions trust only the deployment CA of the node's `[tls]`
//! section. A parent *requires* a client certificate from that CA; a child
//! dials its parent with the parent's node id as the TLS server name, so a
//! peer holding a certificate for any other node fails verification. After
//! the handshake, [`peer_node_id`] reads the peer's node id from its
//! certificate; frames never get to claim an identity.
//!
//! One crypto provider (ring) is passed explicitly everywhere, so the
//! process-wide default provider is irrelevant.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tiersync_protocol::NodeId;

use crate::certs;
use crate::config::TlsSection;

/// The ALPN protocol of replication links.
pub const ALPN: &[u8] = b"tiersync/1";
/// Keep-alive interval: well under the idle timeout, and short enough to keep
/// NAT and firewall state alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A link with no packets for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// UDP send and receive buffer size asked of the kernel. The Linux default
/// (208 KiB) drops packets at replication rates; the kernel caps the request
/// at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Why TLS material or a secured link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}", file = .file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file does not hold the expected PEM item, or holds a bad one.
    #[error("{file}: not a valid PEM {what}: {reason}", file = .file.display())]
    Pem {
        /// The file.
        file: PathBuf,
        /// What was expected: `certificate` or `private key`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The CA certificate cannot be used as a trust anchor.
    #[error("{file}: unusable CA certificate: {source}", file = .file.display())]
    Ca {
        /// The CA file.
        file: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The node certificate and key do not make a usable identity (for
    /// example the key does not match the certificate).
    #[error("{cert} with {key}: unusable certificate and key: {source}", cert = .cert.display(), key = .key.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("{file}: cannot verify clients against this CA: {source}", file = .file.display())]
    Verifier {
        /// The CA file.
        file: PathBuf,
        /// rustls's reason.
        source: rustls::server::VerifierBuilderError,
    },
    /// Any other rustls configuration error.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The TLS configuration cannot be used for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A UDP socket could not be bound or set up.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A connection could not be started (e.g. a server name that is not a
    /// valid DNS name).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The peer address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The handshake or the connection failed (including certificate
    /// verification on either side).
    #[error("connection to {addr} failed: {source}")]
    Connection {
        /// The peer address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The peer's certificate does not name exactly one node id.
    #[error("peer certificate: {0}")]
    PeerIdentity(String),
    /// The peer's certificate names another node than the one dialled.
    #[error("peer certificate names {found}, expected {expected}")]
    WrongPeer {
        /// The node id dialled.
        expected: NodeId,
        /// The node id in its certificate.
        found: NodeId,
    },
}

/// The ring provider, the only one tiersync uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read {
        file: file.to_path_buf(),
        source,
    })
}

fn pem_error(file: &Path, what: &'static str, e: rustls_pki_types::pem::Error) -> TlsError {
    let reason = match e {
        rustls_pki_types::pem::Error::NoItemsFound => "no such PEM section found".to_string(),
        other => other.to_string(),
    };
    TlsError::Pem {
        file: file.to_path_buf(),
        what,
        reason,
    }
}

/// Every certificate of a PEM file (at least one).
fn load_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_pem_all(file, "certificate")
}

/// Every `what` of a PEM file (at least one).
fn load_pem_all<T: PemObject>(file: &Path, what: &'static str) -> Result<Vec<T>, TlsError> {
    let bytes = read(file)?;
    let items = T::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(file, what, e))?;
    if items.is_empty() {
        return Err(pem_error(
            file,
            what,
            rustls_pki_types::pem::Error::NoItemsFound,
        ));
    }
    Ok(items)
}

fn load_key(file: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(&read(file)?).map_err(|e| pem_error(file, "private key", e))
}

fn load_roots(tls: &TlsSection) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in load_certs(&tls.ca)? {
        roots.add(ca).map_err(|source| TlsError::Ca {
            file: tls.ca.clone(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The revocation list of `[tls] crl`, if any (none: nothing revoked).
fn load_crls(
    tls: &TlsSection,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    let Some(file) = &tls.crl else {
        return Ok(Vec::new());
    };
    load_pem_all(file, "revocation list")
}

/// The serial numbers `[tls] crl` revokes (empty without one): what a
/// reload compares live links against.
pub fn revoked_serials(tls: &TlsSection) -> Result<RevokedSerials, TlsError> {
    let Some(file) = &tls.crl else {
        return Ok(RevokedSerials::default());
    };
    let list = certs::read_crl(file).map_err(|e| TlsError::Pem {
        file: file.clone(),
        what: "revocation list",
        reason: e.to_string(),
    })?;
    Ok(list.into_iter().map(|r| r.serial).collect())
}

/// Serial numbers of revoked certificates.
pub type RevokedSerials = std::collections::BTreeSet<Vec<u8>>;

fn identity_error(tls: &TlsSection) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    |source| TlsError::Identity {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        source,
    }
}

/// The HTTP API's rustls server side: this node's certificate and key, no
/// client certificate (clients present bearer tokens), HTTP/1.1.
pub fn api_server_config(tls: &TlsSection) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(identity_error(tls))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Verifies a parent's certificate: issued by the deployment CA, not on
/// its revocation list.
fn server_verifier(
    tls: &TlsSection,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(load_roots(tls)?, provider)
        .with_crls(load_crls(tls)?)
        .only_check_end_entity_revocation()
        // A certificate of another issuer has no status on this CA's list;
        // it fails chain building anyway, with the error that says so.
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| TlsError::Verifier {
            file: tls.ca.clone(),
            source,
        })
}

/// The rustls server side: presents this node's certificate and requires a
/// client certificate issued by the deployment CA. TLS 1.3 only (QUIC).
pub fn server_config(tls: &TlsSection) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(tls)?, provider.clone())
        .with_crls(load_crls(tls)?)
        .only_check_end_entity_revocation()
        // A certificate of another issuer has no status on this CA's list;
        // it fails chain building anyway, with the error that says so.
        .allow_unknown_revocation_status()
        .build()
        .map_err(|source| TlsError::Verifier {
            file: tls.ca.clone(),
            source,
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(identity_error(tls))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The rustls client side: verifies the server against the deployment CA
/// (and the server name given at connect time) and presents this node's
/// certificate. TLS 1.3 only (QUIC).
pub fn client_config(tls: &TlsSection) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = server_verifier(tls, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(identity_error(tls))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The uplink's TLS material: the certificate this node presents and the
/// CA it trusts, read at each handshake, so a reload swaps them without a
/// new endpoint (quinn keeps an endpoint's default client configuration per
/// handle, out of reach of the handle the uplink holds).
#[derive(Debug)]
pub struct ClientMaterial {
    key: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    verifier: arc_swap::ArcSwap<rustls::client::WebPkiServerVerifier>,
}

type Material = (
    Arc<rustls::sign::CertifiedKey>,
    Arc<rustls::client::WebPkiServerVerifier>,
);

impl ClientMaterial {
    /// Reads the `[tls]` files.
    pub fn load(tls: &TlsSection) -> Result<Arc<Self>, TlsError> {
        let (key, verifier) = Self::read(tls)?;
        Ok(Arc::new(Self {
            key: arc_swap::ArcSwap::new(key),
            verifier: arc_swap::ArcSwap::new(verifier),
        }))
    }

    /// Reads the `[tls]` files again and, only if all of them are usable,
    /// uses them for the next handshakes.
    pub fn reload(&self, tls: &TlsSection) -> Result<(), TlsError> {
        let (key, verifier) = Self::read(tls)?;
        self.key.store(key);
        self.verifier.store(verifier);
        Ok(())
    }

    fn read(tls: &TlsSection) -> Result<Material, TlsError> {
        let provider = provider();
        let key = rustls::sign::CertifiedKey::from_der(
            load_certs(&tls.cert)?,
            load_key(&tls.key)?,
            &provider,
        )
        .map_err(identity_error(tls))?;
        let verifier = server_verifier(tls, provider)?;
        Ok((Arc::new(key), verifier))
    }
}

impl rustls::client::ResolvesClientCert for ClientMaterial {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.key.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for ClientMaterial {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.verifier.load().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.verifier
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.verifier.load().supported_verify_schemes()
    }
}

/// The quinn client configuration of a node that dials its parent, with
/// its certificate and CA taken from `material` at each handshake (the
/// same checks as [`client_config`]: the server against the CA and the
/// parent's node id as server name).
pub fn quinn_client_config_reloadable(
    material: Arc<ClientMaterial>,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(material.clone())
        .with_client_cert_resolver(material);
    config.alpn_protocols = vec![ALPN.to_vec()];
    quinn_client_config_from(config)
}

/// Transport settings of every link: keep-alive [`KEEP_ALIVE`], idle
/// timeout [`IDLE_TIMEOUT`].
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    let idle_ms = u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(idle_ms).into()));
    transport
}

/// The quinn server configuration of a node that accepts children.
pub fn quinn_server_config(tls: &TlsSection) -> Result<quinn::ServerConfig, TlsError> {
    quinn_server_config_from(server_config(tls)?)
}

fn quinn_server_config_from(config: rustls::ServerConfig) -> Result<quinn::ServerConfig, TlsError> {
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(config)?));
    server.transport_config(Arc::new(transport_config()));
    Ok(server)
}

/// The quinn client configuration of a node that dials its parent.
pub fn quinn_client_config(tls: &TlsSection) -> Result<quinn::ClientConfig, TlsError> {
    quinn_client_config_from(client_config(tls)?)
}

fn quinn_client_config_from(config: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(config)?));
    client.transport_config(Arc::new(transport_config()));
    Ok(client)
}

/// Binds a UDP socket with enlarged buffers ([`SOCKET_BUFFER_BYTES`]) and
/// makes a quinn endpoint of it. Needs a tokio runtime.
fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    endpoint_config: quinn::EndpointConfig,
) -> Result<quinn::Endpoint, TlsError> {
    let bind = |source| TlsError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind)?;
    // Best effort: the kernel silently caps the sizes; say so once.
    let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
    if let Ok(got) = state.recv_buffer_size((&socket).into()) {
        // Linux reports twice the size it granted, so a full grant reads as
        // at least the size asked for.
        if got < SOCKET_BUFFER_BYTES {
            tracing::warn!(
                %addr,
                granted = got,
                wanted = SOCKET_BUFFER_BYTES,
                "UDP receive buffer is smaller than wanted; raise net.core.rmem_max to avoid packet drops"
            );
        }
    }
    quinn::Endpoint::new(
        endpoint_config,
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)
}

/// A server endpoint on `addr` that accepts children with `config` (see
/// [`quinn_server_config`]). Needs a tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, TlsError> {
    endpoint(addr, Some(config), quinn::EndpointConfig::default())
}

/// The peer endpoint of a node that accepts children, on `addr`.
///
/// Its stateless-reset key is derived from the node's private key, so the
/// same node restarted (after a crash) recognises its old connections and
/// resets them at once: a child then reconnects in milliseconds instead of
/// waiting out the idle timeout.
pub fn peer_endpoint(addr: SocketAddr, tls: &TlsSection) -> Result<quinn::Endpoint, TlsError> {
    let key = std::fs::read(&tls.key).map_err(|source| TlsError::Read {
        file: tls.key.clone(),
        source,
    })?;
    let mut seed = b"tiersync stateless reset v1\0".to_vec();
    seed.extend_from_slice(&key);
    let digest = ring::digest::digest(&ring::digest::SHA256, &seed);
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    // Connection ids carry a keyed check; with the same key across restarts
    // an old connection's packets are recognised (and reset), not dropped.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&digest.as_ref()[24..32]);
    let cid_key = u64::from_le_bytes(cid_key);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    endpoint(addr, Some(quinn_server_config(tls)?), config)
}

/// A client endpoint bound to `bind` (e.g. `0.0.0.0:0`) whose default
/// client configuration is `config` (see [`quinn_client_config`]). Needs a
/// tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, TlsError> {
    let mut endpoint = endpoint(bind, None, quinn::EndpointConfig::default())?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Dials the parent `parent` at `addr` with the endpoint's default client
/// configuration. The server name is the parent's node id, so the handshake
/// fails unless the parent's certificate, issued by the deployment CA, names
/// that id; the id read back from the certificate is checked once more.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    parent: &NodeId,
) -> Result<quinn::Connection, TlsError> {
    let connecting = endpoint
        .connect(addr, parent.as_str())
        .map_err(|source| TlsError::Connect { addr, source })?;
    let conn = connecting
        .await
        .map_err(|source| TlsError::Connection { addr, source })?;
    let found = peer_node_id(&conn)?;
    if &found != parent {
        conn.close(0u32.into(), b"wrong peer");
        return Err(TlsError::WrongPeer {
            expected: parent.clone(),
            found,
        });
    }
    Ok(conn)
}

/// The node id of the peer of an established connection: the one DNS SAN
/// of its leaf certificate that is a valid node id. An error if the peer
/// presented no certificate, or its certificate names no or several node
/// ids. The certificate itself was verified against the CA in the handshake.
pub fn peer_node_id(conn: &quinn::Connection) -> Result<NodeId, TlsError> {
    peer_cert(conn).map(|p| p.id)
}

/// What a connected peer's certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Its node id (the one DNS SAN that is a node id).
    pub id: NodeId,
    /// Its tier SAN, if it has one.
    pub tier: Option<tiersync_protocol::Tier>,
    /// Its serial number (what a revocation list names).
    pub serial: Vec<u8>,
}

/// Reads the connected peer's certificate.
pub fn peer_cert(conn: &quinn::Connection) -> Result<PeerCert, TlsError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TlsError::PeerIdentity("the peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::PeerIdentity("the peer identity is not an X.509 chain".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::PeerIdentity("the peer presented an empty chain".into()))?;
    let x509 = certs::parse_der(leaf).map_err(TlsError::PeerIdentity)?;
    let tier = certs::san_identity(&x509)
        .map_err(TlsError::PeerIdentity)?
        .tier;
    Ok(PeerCert {
        id: node_id_of(leaf)?,
        tier,
        serial: x509.raw_serial().to_vec(),
    })
}

/// The node id of a DER certificate: its one DNS SAN that is a node id.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, TlsError> {
    let x509 = certs::parse_der(cert).map_err(TlsError::PeerIdentity)?;
    let mut ids = certs::san_identity(&x509)
        .map_err(TlsError::PeerIdentity)?
        .node_ids;
    match ids.len() {
        1 => Ok(ids.remove(0)),
        0 => Err(TlsError::PeerIdentity("no DNS SAN is a node id".into())),
        _ => {
            let list: Vec<&str> = ids.iter().map(NodeId::as_str).collect();
            Err(TlsError::PeerIdentity(format!(
                "names several node ids: {}",
                list.join(", ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::net::{Ipv4Addr, SocketAddr};

    use tiersync_protocol::Tier;
    use tokio::time::timeout;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);
    const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// Issues `node` under the CA in `dir` and returns its `[tls]` section.
    fn section(dir: &Path, node: &str, tier: Tier) -> TlsSection {
        let files = certs::issue(dir, &id(node), Some(tier), 1).unwrap();
        TlsSection {
            ca: dir.join(certs::CA_CERT_FILE),
            cert: files.cert,
            key: files.key,
            crl: Some(dir.join(certs::CRL_FILE)),
        }
    }

    fn ca_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        certs::init_ca(dir.path()).unwrap();
        dir
    }

    struct Server {
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
    }

    fn server(tls: &TlsSection) -> Server {
        let endpoint = server_endpoint(LOOPBACK, quinn_server_config(tls).unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Server { endpoint, addr }
    }

    /// Accepts one connection; the server's view of the handshake.
    async fn accept(server: &Server) -> Result<quinn::Connection, quinn::ConnectionError> {
        let incoming = server.endpoint.accept().await.expect("endpoint open");
        incoming.await
    }

    /// Runs both sides of one handshake, the client dialling `parent`.
    async fn handshake(
        server: &Server,
        client: &quinn::Endpoint,
        parent: &str,
    ) -> (
        Result<quinn::Connection, quinn::ConnectionError>,
        Result<quinn::Connection, TlsError>,
    ) {
        let parent = id(parent);
        timeout(LIMIT, async {
            tokio::join!(accept(server), connect(client, server.addr, &parent))
        })
        .await
        .expect("handshake finished in time")
    }

    /// Whether a client connection is refused: either its handshake fails,
    /// or (TLS 1.3 clients finish before the server checked their
    /// certificate) it is closed right after.
    async fn client_refused(result: Result<quinn::Connection, TlsError>) -> bool {
        match result {
            Err(_) => true,
            Ok(conn) => {
                let reason = timeout(LIMIT, conn.closed()).await.expect("closed in time");
                !matches!(reason, quinn::ConnectionError::LocallyClosed)
            }
        }
    }

    #[tokio::test]
    async fn mutual_tls_handshake_names_both_peers() {
        let dir = ca_dir();
        let parent = section(dir.path(), "zhejiang", Tier::Province);
        let child = section(dir.path(), "hangzhou", Tier::City);
        let server = server(&parent);
        let client = client_endpoint(LOOPBACK, quinn_client_config(&child).unwrap()).unwrap();

        let (server_side, client_side) = handshake(&server, &client, "zhejiang").await;
        let server_side = server_side.unwrap();
        let client_side = client_side.unwrap();
        assert_eq!(peer_node_id(&server_side).unwrap(), id("hangzhou"));
        assert_eq!(peer_node_id(&client_side).unwrap(), id("zhejiang"));
        assert_eq!(
            server_side
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol),
            Some(ALPN.to_vec())
        );
        client_side.close(0u32.into(), b"done");
        client.wait_idle().await;
    }

    #[tokio::test]
    async fn client_from_another_ca_is_refused() {
        let dir = ca_dir();
        let other = ca_dir();
        let parent = section(dir.path(), "zhejiang", Tier::Province);
        let mut intruder = section(other.path(), "hangzhou", Tier::City);
        // It trusts the real CA, so it would accept the real parent.
        intruder.ca = parent.ca.clone();
        let server = server(&parent);
        let client = client_endpoint(LOOPBACK, quinn_client_config(&intruder).unwrap()).unwrap();

        let (server_side, client_side) = handshake(&server, &client, "zhejiang").await;
        let err = server_side.expect_err("server accepted a foreign certificate");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        assert!(client_refused(client_side).await);
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let dir = ca_dir();
        let parent = section(dir.path(), "zhejiang", Tier::Province);
        let server = server(&parent);
        let mut anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(load_roots(&parent).unwrap())
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN.to_vec()];
        let client =
            client_endpoint(LOOPBACK, quinn_client_config_from(anonymous).unwrap()).unwrap();

        let (server_side, client_side) = handshake(&server, &client, "zhejiang").await;
        let err = server_side.expect_err("server accepted a client without a certificate");
        assert!(err.to_string().contains("no certificates"), "{err}");
        assert!(client_refused(client_side).await);
    }

    #[tokio::test]
    async fn wrong_server_name_fails() {
        let dir = ca_dir();
        // A genuine node of the deployment, but not the parent we dial.
        let impostor = section(dir.path(), "jiangsu", Tier::Province);
        let child = section(dir.path(), "hangzhou", Tier::City);
        let server = server(&impostor);
        let client = client_endpoint(LOOPBACK, quinn_client_config(&child).unwrap()).unwrap();

        let (server_side, client_side) = handshake(&server, &client, "zhejiang").await;
        let err = client_side.expect_err("client accepted a certificate for another node");
        assert!(matches!(err, TlsError::Connection { .. }), "{err}");
        assert!(err.to_string().contains("not valid for name"), "{err}");
        assert!(server_side.is_err());
    }

    #[test]
    fn unreadable_or_invalid_pem_names_the_file() {
        let dir = ca_dir();
        let mut tls = section(dir.path(), "hangzhou", Tier::City);
        std::fs::write(&tls.key, "garbage").unwrap();
        let err = client_config(&tls).unwrap_err();
        assert!(
            matches!(&err, TlsError::Pem { file, .. } if file == &tls.key),
            "{err}"
        );
        tls.ca = dir.path().join("missing.pem");
        let err = server_config(&tls).unwrap_err();
        assert!(
            matches!(&err, TlsError::Read { file, .. } if file == &tls.ca),
            "{err}"
        );
        assert!(err.to_string().contains("missing.pem"));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = ca_dir();
        let mut a = section(dir.path(), "hangzhou", Tier::City);
        let b = section(dir.path(), "ningbo", Tier::City);
        a.key = b.key;
        let err = server_config(&a).unwrap_err();
        assert!(matches!(err, TlsError::Identity { .. }), "{err}");
    }
}
