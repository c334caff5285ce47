//! The deployment CA and node certificates (`tiersync certs …`).
//!
//! One CA per deployment signs one certificate per node. A node certificate
//! names its node id as a DNS subject alternative name (the identity peers
//! check, see [`crate::tls`]) and, optionally, its tier as a second SAN
//! `tier.<tier>.tiersync` (which is never a valid node id, so it cannot be
//! mistaken for one). Keys are ECDSA P-256, written PKCS#8 PEM with mode 0600
//! from the moment the file exists.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use tiersync_protocol::{NodeId, Tier};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The CA certificate's file name inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a new CA is valid.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of a node certificate: short, so that a stolen key
/// stops working soon even if nobody revokes it (renew with `tiersync certs
/// issue --force`, or `certs request` + `certs sign`, then `tiersync reload`).
pub const DEFAULT_NODE_VALIDITY_DAYS: u32 = 90;
/// Longest validity accepted for a node certificate (397 days, as for the
/// public web PKI): longer lifetimes are refused.
pub const MAX_VALIDITY_DAYS: u32 = 397;
/// The certificate revocation list's file name inside a certificate
/// directory (`certs init` writes an empty one, `certs revoke` adds to it).
pub const CRL_FILE: &str = "crl.pem";

/// Certificates are valid from this long before they are made, so a peer
/// whose clock is a little behind accepts a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);
const DAY: u64 = 86_400;

/// Why a certificate operation failed. Every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Refusing to overwrite an existing file (a CA is created once).
    #[error("{file}: already exists; refusing to overwrite it", file = .file.display())]
    Exists {
        /// The file.
        file: PathBuf,
    },
    /// A file or directory could not be read.
    #[error("{file}: cannot read: {source}", file = .file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("{file}: cannot write: {source}", file = .file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a valid PEM certificate or key, or not a usable one.
    #[error("{file}: {reason}", file = .file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("{key}: is not the private key of {cert}", key = .key.display(), cert = .cert.display())]
    KeyMismatch {
        /// The CA certificate.
        cert: PathBuf,
        /// The CA key.
        key: PathBuf,
    },
    /// The node id would collide with the CA's own files.
    #[error("node id {0:?} is reserved: its files would overwrite the CA's")]
    ReservedId(NodeId),
    /// A validity outside `1..=MAX_VALIDITY_DAYS`.
    #[error("validity of {0} days is out of range 1..={MAX_VALIDITY_DAYS}")]
    Validity(u32),
    /// Key generation or signing failed.
    #[error("{file}: cannot generate: {source}", file = .file.display())]
    Generate {
        /// The file that was being generated.
        file: PathBuf,
        /// rcgen's error.
        source: rcgen::Error,
    },
}

/// The two files of a key pair with its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
}

/// What [`inspect`] reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The node id in the DNS SANs; `None` for a certificate without one
    /// (such as the CA's).
    pub node_id: Option<NodeId>,
    /// The tier SAN (`tier.<tier>.tiersync`), if present.
    pub tier: Option<Tier>,
    /// The subject distinguished name, e.g. `CN=hangzhou`.
    pub subject: String,
    /// The issuer distinguished name, e.g. `CN=tiersync CA 1a2b3c4d`.
    pub issuer: String,
    /// Whether this is a CA certificate.
    pub is_ca: bool,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// The tier SAN for `tier`: `tier.<tier>.tiersync`.
pub fn tier_san(tier: Tier) -> String {
    format!("tier.{tier}.tiersync")
}

fn tier_from_san(name: &str) -> Option<Tier> {
    let t = name.strip_prefix("tier.")?.strip_suffix(".tiersync")?;
    [Tier::City, Tier::Province, Tier::National]
        .into_iter()
        .find(|tier| tier.as_str() == t)
}

/// The identity carried by a certificate's DNS SANs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SanIdentity {
    /// Every DNS SAN that is a valid node id.
    pub node_ids: Vec<NodeId>,
    /// The tier SAN, if any.
    pub tier: Option<Tier>,
}

/// Reads the node ids and tier from a parsed certificate's DNS SANs.
pub(crate) fn san_identity(cert: &X509Certificate<'_>) -> Result<SanIdentity, String> {
    let mut id = SanIdentity::default();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative name extension: {e}"))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::DNSName(dns) = name {
            if let Ok(node) = NodeId::new(*dns) {
                id.node_ids.push(node);
            } else if let Some(tier) = tier_from_san(dns) {
                id.tier = Some(tier);
            }
        }
    }
    Ok(id)
}

/// Parses one DER certificate.
pub(crate) fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".to_string()),
        Err(e) => Err(format!("not a valid X.509 certificate: {e}")),
    }
}

/// The DER bytes of the first `CERTIFICATE` block of a PEM file.
fn read_pem_cert(file: &Path) -> Result<Vec<u8>, CertError> {
    let bytes = fs::read(file).map_err(|source| CertError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| CertError::Invalid {
        file: file.to_path_buf(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes)
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(invalid(format!(
            "expected a CERTIFICATE, found {}",
            pem.label
        )));
    }
    Ok(pem.contents)
}

fn read_key(file: &Path) -> Result<KeyPair, CertError> {
    let text = fs::read_to_string(file).map_err(|source| CertError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    KeyPair::from_pem(&text).map_err(|e| CertError::Invalid {
        file: file.to_path_buf(),
        reason: format!("not a usable private key: {e}"),
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sets `[now - BACKDATE, now + days]`, the end capped at `cap` (Unix secs).
fn set_validity(params: &mut CertificateParams, days: u32, cap: Option<u64>) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = now_secs();
    let mut end = now + u64::from(days) * DAY;
    if let Some(cap) = cap {
        end = end.min(cap);
    }
    params.not_before = epoch + Duration::from_secs(now.saturating_sub(BACKDATE.as_secs()));
    params.not_after = epoch + Duration::from_secs(end);
}

/// Creates `dir` (mode 0700) if it does not exist.
fn ensure_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Write {
            file: dir.to_path_buf(),
            source,
        })
}

/// Writes a new file that must not exist yet, created with `mode`.
fn write_new(file: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let write_err = |source| CertError::Write {
        file: file.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(file)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists {
                    file: file.to_path_buf(),
                }
            } else {
                write_err(e)
            }
        })?;
    if let Err(e) = f.write_all(contents).and_then(|()| f.sync_all()) {
        drop(f);
        let _ = fs::remove_file(file);
        return Err(write_err(e));
    }
    Ok(())
}

/// Replaces `file` atomically: a temporary file created with `mode` in the
/// same directory, then renamed over it. A reader never sees half a file.
fn write_replace(file: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = file.with_file_name(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, file).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        CertError::Write {
            file: file.to_path_buf(),
            source,
        }
    })
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| CertError::Write {
            file: dir.to_path_buf(),
            source,
        })
}

/// Creates a new deployment CA in `dir` (created if missing): `ca.pem` and
/// `ca.key` (mode 0600), valid for [`CA_VALIDITY_DAYS`]. Refuses if either
/// file already exists, so a CA that signed a deployment is never lost.
pub fn init_ca(dir: &Path) -> Result<CertFiles, CertError> {
    let files = CertFiles {
        cert: dir.join(CA_CERT_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for file in [&files.cert, &files.key] {
        if file.exists() {
            return Err(CertError::Exists { file: file.clone() });
        }
    }
    let generate = |source| CertError::Generate {
        file: files.cert.clone(),
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // A random suffix tells deployments' CAs apart in `inspect` and logs.
    dn.push(
        DnType::CommonName,
        format!("tiersync CA {:08x}", rand::random::<u32>()),
    );
    dn.push(DnType::OrganizationName, "tiersync");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY_DAYS, None);
    let cert = params.self_signed(&key).map_err(generate)?;

    ensure_dir(dir)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&files.cert, cert.pem().as_bytes(), 0o644) {
        // Do not leave a key without its certificate behind.
        let _ = fs::remove_file(&files.key);
        return Err(e);
    }
    sync_dir(dir)?;
    // An empty revocation list, so that every node file can name it from
    // the start and `certs revoke` only ever adds to it.
    write_crl(dir, Vec::new())?;
    Ok(files)
}

/// A certificate on the revocation list: its serial number (the DER
/// INTEGER's content bytes) and when it was revoked (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The serial number.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub at: i64,
}

/// Reads the one PEM `what` of `file`.
fn read_pem<T: PemObject>(file: &Path, what: &str) -> Result<T, CertError> {
    let text = fs::read(file).map_err(|source| CertError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    T::from_pem_slice(&text).map_err(|e| CertError::Invalid {
        file: file.to_path_buf(),
        reason: format!("not a PEM {what}: {e}"),
    })
}

/// Reads the revocation list `file` (PEM): the certificates it revokes.
pub fn read_crl(file: &Path) -> Result<Vec<Revoked>, CertError> {
    let der: rustls_pki_types::CertificateRevocationListDer<'static> =
        read_pem(file, "revocation list")?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| CertError::Invalid {
        file: file.to_path_buf(),
        reason: format!("not a valid revocation list: {e}"),
    })?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.raw_serial().to_vec(),
            at: r.revocation_date.timestamp(),
        })
        .collect())
}

/// The serial number of the certificate `file` (PEM).
pub fn serial_of(file: &Path) -> Result<Vec<u8>, CertError> {
    let der = read_pem_cert(file)?;
    let x509 = parse_der(&der).map_err(|reason| CertError::Invalid {
        file: file.to_path_buf(),
        reason,
    })?;
    Ok(x509.raw_serial().to_vec())
}

/// Signs and writes `dir/crl.pem` (atomically) revoking `revoked`, with
/// the CA of `dir`; its number is the signing time, so it only grows.
fn write_crl(dir: &Path, revoked: Vec<Revoked>) -> Result<PathBuf, CertError> {
    let file = dir.join(CRL_FILE);
    let ca = load_ca(dir)?;
    let now = now_secs();
    let offset_time = |secs: i64| {
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    };
    let params = rcgen::CertificateRevocationListParams {
        this_update: offset_time(
            i64::try_from(now.saturating_sub(BACKDATE.as_secs())).unwrap_or(0),
        ),
        next_update: offset_time(i64::try_from(ca.not_after.max(now + DAY)).unwrap_or(i64::MAX)),
        crl_number: rcgen::SerialNumber::from_slice(&now.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .into_iter()
            .map(|r| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial),
                revocation_time: offset_time(r.at),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.issuer)
        .and_then(|c| c.pem())
        .map_err(|source| CertError::Generate {
            file: file.clone(),
            source,
        })?;
    write_replace(&file, crl.as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Revokes the certificate of `node_id` (`dir/<id>.pem`) with the CA of
/// `dir`: adds its serial number to `dir/crl.pem` (created if missing) and
/// returns the list's file. Nodes refuse it once they read the new list
/// (`tiersync reload`, or SIGHUP), and close its live links.
pub fn revoke(dir: &Path, node_id: &NodeId) -> Result<PathBuf, CertError> {
    let serial = serial_of(&dir.join(format!("{node_id}.pem")))?;
    let crl = dir.join(CRL_FILE);
    let mut revoked = if crl.exists() {
        read_crl(&crl)?
    } else {
        Vec::new()
    };
    if !revoked.iter().any(|r| r.serial == serial) {
        revoked.push(Revoked {
            serial,
            at: i64::try_from(now_secs()).unwrap_or(i64::MAX),
        });
    }
    write_crl(dir, revoked)
}

/// A random positive serial number of 16 bytes: a certificate signed again
/// for the same key (a renewal from the same request) is still told apart
/// from a revoked one.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The CA of `dir`, ready to sign, and its expiry (Unix secs).
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    subject_der: Vec<u8>,
    not_after: u64,
}

fn load_ca(dir: &Path) -> Result<Ca, CertError> {
    let cert_file = dir.join(CA_CERT_FILE);
    let key_file = dir.join(CA_KEY_FILE);
    let der = read_pem_cert(&cert_file)?;
    let invalid = |reason: String| CertError::Invalid {
        file: cert_file.clone(),
        reason,
    };
    let x509 = parse_der(&der).map_err(invalid)?;
    if !x509.is_ca() {
        return Err(invalid(
            "not a CA certificate (basicConstraints CA:false)".into(),
        ));
    }
    let key = read_key(&key_file)?;
    if key.subject_public_key_info() != x509.public_key().raw {
        return Err(CertError::KeyMismatch {
            cert: cert_file,
            key: key_file,
        });
    }
    let not_after = x509.validity().not_after.timestamp();
    if not_after <= i64::try_from(now_secs()).unwrap_or(i64::MAX) {
        return Err(invalid(format!(
            "the CA expired at {}",
            x509.validity().not_after
        )));
    }
    // rcgen (without its x509-parser feature) cannot read a CA certificate,
    // so rebuild the issuer's name from the parsed subject. `issue` checks
    // that the result encodes to the same bytes.
    let mut dn = DistinguishedName::new();
    for attr in x509.subject().iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .map(Iterator::collect)
            .ok_or_else(|| invalid("subject has an unsupported attribute type".into()))?;
        let text = attr
            .as_str()
            .map_err(|_| invalid("subject has a non-string attribute".into()))?;
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_string()),
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| invalid("subject has a bad PrintableString".into()))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text.try_into()
                    .map_err(|_| invalid("subject has a bad IA5String".into()))?,
            ),
            _ => return Err(invalid("subject has an unsupported string type".into())),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(Ca {
        issuer: Issuer::new(params, key),
        subject_der: x509.subject().as_raw().to_vec(),
        not_after: u64::try_from(not_after).unwrap_or(0),
    })
}

/// Issues a certificate for `node_id`, signed by the CA in `dir`: writes
/// `<id>.pem` and `<id>.key` (mode 0600) there, replacing earlier ones
/// atomically (renewal). For a deployment whose CA never sees node keys,
/// use [`request`] on the node and [`sign`] at the CA instead; this is for
/// tests and single-machine setups (`tiersync demo`).
pub fn issue(
    dir: &Path,
    node_id: &NodeId,
    tier: Option<Tier>,
    validity_days: u32,
) -> Result<CertFiles, CertError> {
    issue_with_hosts(dir, node_id, tier, validity_days, &[])
}

/// [`issue`], with extra SANs clients of the node's HTTPS API name it by:
/// IP addresses, or DNS names with a dot (never a bare name: it would read
/// as a second node id).
pub fn issue_with_hosts(
    dir: &Path,
    node_id: &NodeId,
    tier: Option<Tier>,
    validity_days: u32,
    api_hosts: &[String],
) -> Result<CertFiles, CertError> {
    let files = node_files(dir, node_id)?;
    let key = KeyPair::generate().map_err(|source| CertError::Generate {
        file: files.key.clone(),
        source,
    })?;
    let cert = sign_public_key(
        dir,
        node_id,
        tier,
        validity_days,
        api_hosts,
        &key,
        &files.cert,
    )?;
    write_replace(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_replace(&files.cert, cert.as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(files)
}

/// `<dir>/<id>.pem` and `<dir>/<id>.key`, unless they are the CA's.
fn node_files(dir: &Path, node_id: &NodeId) -> Result<CertFiles, CertError> {
    let files = CertFiles {
        cert: dir.join(format!("{node_id}.pem")),
        key: dir.join(format!("{node_id}.key")),
    };
    if files.cert.file_name() == Some(CA_CERT_FILE.as_ref())
        || files.key.file_name() == Some(CA_KEY_FILE.as_ref())
    {
        return Err(CertError::ReservedId(node_id.clone()));
    }
    Ok(files)
}

/// Signs a node certificate (PEM) for `public_key` with the CA of `dir`.
/// The node id is the first DNS SAN; `tier`, if given, adds
/// `tier.<tier>.tiersync`. Valid from an hour ago for `validity_days`
/// (`1..=MAX_VALIDITY_DAYS`), but never beyond the CA's own expiry. Usable
/// for client and server authentication: every node both accepts children
/// and dials its parent, and its HTTP API may serve TLS with it.
fn sign_public_key(
    dir: &Path,
    node_id: &NodeId,
    tier: Option<Tier>,
    validity_days: u32,
    api_hosts: &[String],
    public_key: &impl PublicKeyData,
    cert_file: &Path,
) -> Result<String, CertError> {
    if !(1..=MAX_VALIDITY_DAYS).contains(&validity_days) {
        return Err(CertError::Validity(validity_days));
    }
    let ca = load_ca(dir)?;
    let generate = |source| CertError::Generate {
        file: cert_file.to_path_buf(),
        source,
    };
    let mut params = node_params(node_id).map_err(generate)?;
    let mut sans = params.subject_alt_names.clone();
    if let Some(tier) = tier {
        sans.push(SanType::DnsName(
            tier_san(tier).try_into().map_err(generate)?,
        ));
    }
    for host in api_hosts {
        sans.push(match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.as_str().try_into().map_err(generate)?),
        });
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity_days, Some(ca.not_after));
    let cert = params.signed_by(public_key, &ca.issuer).map_err(generate)?;

    // The issuer name must match the CA's subject byte for byte, or no
    // verifier will chain the certificate to the CA.
    let issued = parse_der(cert.der()).map_err(|reason| CertError::Invalid {
        file: cert_file.to_path_buf(),
        reason,
    })?;
    if issued.issuer().as_raw() != ca.subject_der.as_slice() {
        return Err(CertError::Invalid {
            file: dir.join(CA_CERT_FILE),
            reason: "the CA's subject name cannot be reproduced; was this CA made by `tiersync certs init`?".into(),
        });
    }
    Ok(cert.pem())
}

/// What [`request`] wrote on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFiles {
    /// The private key (PKCS#8 PEM, mode 0600): it never leaves the node.
    pub key: PathBuf,
    /// The certificate signing request (PEM), for the CA.
    pub csr: PathBuf,
}

/// On the node: makes `dir/<id>.key` (mode 0600) and a signing request
/// `dir/<id>.csr` for the CA. An existing key is kept (a renewal requests a
/// new certificate for it) unless `new_key`, which replaces it (after a
/// compromise). The key never leaves `dir`.
pub fn request(dir: &Path, node_id: &NodeId, new_key: bool) -> Result<RequestFiles, CertError> {
    let files = node_files(dir, node_id)?;
    let csr_file = dir.join(format!("{node_id}.csr"));
    ensure_dir(dir)?;
    let key = if files.key.exists() && !new_key {
        read_key(&files.key)?
    } else {
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            file: files.key.clone(),
            source,
        })?;
        write_replace(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        key
    };
    let generate = |source| CertError::Generate {
        file: csr_file.clone(),
        source,
    };
    let params = node_params(node_id).map_err(generate)?;
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(generate)?;
    write_replace(&csr_file, csr.as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(RequestFiles {
        key: files.key,
        csr: csr_file,
    })
}

/// What names a node in its certificate and its signing request alike: the
/// node id as common name and as first DNS SAN.
fn node_params(node_id: &NodeId) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(node_id.as_str().try_into()?)];
    Ok(params)
}

/// An ECDSA P-256 public key taken from a signing request.
struct RequestedKey(Vec<u8>);

impl PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// At the CA: signs the request `csr` (from [`request`]) for `node_id`,
/// writing `dir/<id>.pem`. The request must name `node_id` (its common
/// name), hold an ECDSA P-256 key and be signed by that key (proof that
/// the requester holds it). No private key is read or written but the
/// CA's.
pub fn sign(
    dir: &Path,
    csr: &Path,
    node_id: &NodeId,
    tier: Option<Tier>,
    validity_days: u32,
    api_hosts: &[String],
) -> Result<PathBuf, CertError> {
    let files = node_files(dir, node_id)?;
    let invalid = |reason: String| CertError::Invalid {
        file: csr.to_path_buf(),
        reason,
    };
    let der: rustls_pki_types::CertificateSigningRequestDer<'static> =
        read_pem(csr, "signing request")?;
    use x509_parser::prelude::FromDer;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| invalid(format!("not a valid signing request: {e}")))?;
    let info = &req.certification_request_info;
    let named = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    if named.as_deref() != Some(node_id.as_str()) {
        return Err(invalid(format!(
            "the request is for {}, not {node_id}",
            named.as_deref().unwrap_or("no node id")
        )));
    }
    let spki = &info.subject_pki;
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let ec = x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != ec || curve.as_ref() != Some(&p256) {
        return Err(invalid(
            "the request's key is not ECDSA P-256 (make it with `tiersync certs request`)".into(),
        ));
    }
    let key = spki.subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &key)
        .verify(info.raw, &req.signature_value.data)
        .map_err(|_| invalid("the request's signature does not verify with its key".into()))?;
    let cert = sign_public_key(
        dir,
        node_id,
        tier,
        validity_days,
        api_hosts,
        &RequestedKey(key),
        &files.cert,
    )?;
    write_replace(&files.cert, cert.as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(files.cert)
}

/// Reads a PEM certificate: its node id, tier, names and validity.
pub fn inspect(cert_pem: &Path) -> Result<CertInfo, CertError> {
    let der = read_pem_cert(cert_pem)?;
    let invalid = |reason: String| CertError::Invalid {
        file: cert_pem.to_path_buf(),
        reason,
    };
    let x509 = parse_der(&der).map_err(invalid)?;
    let ids = san_identity(&x509).map_err(invalid)?;
    if ids.node_ids.len() > 1 {
        let list: Vec<&str> = ids.node_ids.iter().map(NodeId::as_str).collect();
        return Err(invalid(format!(
            "names several node ids: {}",
            list.join(", ")
        )));
    }
    Ok(CertInfo {
        node_id: ids.node_ids.into_iter().next(),
        tier: ids.tier,
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        is_ca: x509.is_ca(),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn mode(file: &Path) -> u32 {
        fs::metadata(file).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn key_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        assert_eq!(mode(&ca.key), 0o600);
        let node = issue(dir.path(), &id("hangzhou"), Some(Tier::City), 30).unwrap();
        assert_eq!(mode(&node.key), 0o600);
        // Re-issuing (renewal) replaces the files and keeps the mode.
        let again = issue(dir.path(), &id("hangzhou"), None, 30).unwrap();
        assert_eq!(mode(&again.key), 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            5,
            "no temporary files left (CA, its revocation list, the node's two files)"
        );
    }

    #[test]
    fn ca_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let first = init_ca(dir.path()).unwrap();
        let before = fs::read(&first.cert).unwrap();
        let err = init_ca(dir.path()).unwrap_err();
        assert!(
            matches!(&err, CertError::Exists { file } if file == &first.cert),
            "{err}"
        );
        assert_eq!(fs::read(&first.cert).unwrap(), before);
        // A node named `ca` would clobber the CA.
        assert!(matches!(
            issue(dir.path(), &id("ca"), None, 1),
            Err(CertError::ReservedId(_))
        ));
    }

    #[test]
    fn inspect_reads_id_tier_issuer_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init_ca(dir.path()).unwrap();
        let node = issue(dir.path(), &id("zhejiang"), Some(Tier::Province), 10).unwrap();
        let info = inspect(&node.cert).unwrap();
        let ca_info = inspect(&ca.cert).unwrap();
        assert_eq!(info.node_id, Some(id("zhejiang")));
        assert_eq!(info.tier, Some(Tier::Province));
        assert!(!info.is_ca);
        assert_eq!(info.issuer, ca_info.subject);
        assert!(ca_info.is_ca && ca_info.node_id.is_none());
        let now = i64::try_from(now_secs()).unwrap();
        assert!(
            (info.not_after - (now + 10 * 86_400)).abs() < 60,
            "{info:?}"
        );
        assert!(info.not_before < now);
    }

    #[test]
    fn node_validity_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let node = issue(dir.path(), &id("n1"), None, MAX_VALIDITY_DAYS).unwrap();
        let now = i64::try_from(now_secs()).unwrap();
        let days = (inspect(&node.cert).unwrap().not_after - now) / 86_400;
        assert!(days <= i64::from(MAX_VALIDITY_DAYS), "{days}");
        for absurd in [0, MAX_VALIDITY_DAYS + 1, 36_500] {
            assert!(matches!(
                issue(dir.path(), &id("n1"), None, absurd),
                Err(CertError::Validity(d)) if d == absurd
            ));
        }
    }

    /// Case 4 of issue 15: `revoke` puts the node's current certificate on
    /// the CA's list (once), keeps earlier entries, and a renewed
    /// certificate (a new serial) is not on it.
    #[test]
    fn revoke_lists_the_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        assert!(read_crl(&dir.path().join(CRL_FILE)).unwrap().is_empty());
        let a = issue(dir.path(), &id("hangzhou"), None, 30).unwrap();
        let b = issue(dir.path(), &id("ningbo"), None, 30).unwrap();
        let crl = revoke(dir.path(), &id("hangzhou")).unwrap();
        revoke(dir.path(), &id("hangzhou")).unwrap();
        revoke(dir.path(), &id("ningbo")).unwrap();
        let listed: Vec<Vec<u8>> = read_crl(&crl)
            .unwrap()
            .into_iter()
            .map(|r| r.serial)
            .collect();
        assert_eq!(
            listed,
            vec![serial_of(&a.cert).unwrap(), serial_of(&b.cert).unwrap()]
        );
        let renewed = issue(dir.path(), &id("hangzhou"), None, 30).unwrap();
        assert!(!listed.contains(&serial_of(&renewed.cert).unwrap()));
        assert!(matches!(
            revoke(dir.path(), &id("nobody")),
            Err(CertError::Read { .. })
        ));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // No CA yet.
        let err = issue(dir.path(), &id("n1"), None, 1).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        // Garbage certificate.
        let bad = dir.path().join("bad.pem");
        fs::write(&bad, "not a certificate").unwrap();
        let err = inspect(&bad).unwrap_err();
        assert!(err.to_string().contains("bad.pem"), "{err}");
        // A CA key that does not match its certificate.
        let other = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        init_ca(other.path()).unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = issue(dir.path(), &id("n1"), None, 1).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    }

    /// Case 5 of issue 15: the key is made on the node and stays there;
    /// the CA signs the request for the id it names, and the certificate
    /// works with the node's own key; a request for another id, or whose
    /// signature does not verify, is refused.
    #[test]
    fn a_request_signed_at_the_ca_keeps_the_key_on_the_node() {
        let ca = tempfile::tempdir().unwrap();
        init_ca(ca.path()).unwrap();
        let node = tempfile::tempdir().unwrap();
        let req = request(node.path(), &id("hangzhou"), false).unwrap();
        assert_eq!(mode(&req.key), 0o600);
        let key_before = fs::read(&req.key).unwrap();
        let cert = sign(
            ca.path(),
            &req.csr,
            &id("hangzhou"),
            Some(Tier::City),
            90,
            &[],
        )
        .unwrap();
        let info = inspect(&cert).unwrap();
        assert_eq!(info.node_id, Some(id("hangzhou")));
        assert_eq!(info.tier, Some(Tier::City));
        assert!(
            !ca.path().join("hangzhou.key").exists(),
            "no node key at the CA"
        );
        // The certificate and the node's own key make a TLS identity.
        let tls = crate::config::TlsSection {
            ca: ca.path().join(CA_CERT_FILE),
            cert: cert.clone(),
            key: req.key.clone(),
            crl: Some(ca.path().join(CRL_FILE)),
        };
        crate::tls::server_config(&tls).unwrap();
        // Renewal: a new request keeps the key.
        request(node.path(), &id("hangzhou"), false).unwrap();
        assert_eq!(fs::read(&req.key).unwrap(), key_before);
        // Another id than the request names.
        let err = sign(ca.path(), &req.csr, &id("ningbo"), None, 90, &[]).unwrap_err();
        assert!(err.to_string().contains("not ningbo"), "{err}");
        // A tampered request: one base64 digit of its signature changed.
        let pem = fs::read_to_string(&req.csr).unwrap();
        let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
        let sig_line = lines.len() - 3;
        let flipped: String = lines[sig_line]
            .chars()
            .enumerate()
            .map(|(i, c)| match (i, c) {
                (4, 'A') => 'B',
                (4, _) => 'A',
                (_, c) => c,
            })
            .collect();
        lines[sig_line] = flipped;
        let b64 = lines.join("\n") + "\n";
        let bad = node.path().join("bad.csr");
        fs::write(&bad, b64).unwrap();
        assert!(sign(ca.path(), &bad, &id("hangzhou"), None, 90, &[]).is_err());
    }

    #[test]
    fn tier_sans_round_trip_and_are_not_node_ids() {
        for tier in [Tier::City, Tier::Province, Tier::National] {
            assert_eq!(tier_from_san(&tier_san(tier)), Some(tier));
            assert!(NodeId::new(tier_san(tier)).is_err());
        }
        assert_eq!(tier_from_san("tier.village.tiersync"), None);
    }
}
