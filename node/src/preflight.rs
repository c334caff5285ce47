//! Checks of one node's certificates and keys, shared by `tiersync run`
//! (before it opens the store) and `tiersync config check`.
//!
//! `run` refuses to start on any error here, so a node with a missing,
//! expired or foreign certificate fails before RocksDB exists and says which
//! file is at fault; `config check` reports the same, plus a warning for a
//! certificate that expires within [`EXPIRY_WARNING_DAYS`].

use std::path::Path;

use tiersync_protocol::NodeId;

use crate::certs;
use crate::config::{Loaded, TlsSection};
use crate::deployment::Problem;

/// A certificate expiring within this many days is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What the checks found: errors stop a start, warnings do not.
#[derive(Debug, Default)]
pub struct Findings {
    /// Problems `run` refuses to start with.
    pub errors: Vec<Problem>,
    /// A certificate outside its validity (expired, or not yet valid on
    /// this clock): `config check` refuses it; `run` starts anyway and says
    /// so loudly, since the node serves local reads and writes without its
    /// links, and only the links need valid certificates.
    pub validity: Vec<Problem>,
    /// Things to act on soon (a certificate about to expire).
    pub warnings: Vec<Problem>,
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX)
}

/// Checks the `[tls]` files of `node` at time `now` (Unix seconds): each
/// file readable, the CA a CA, the certificate this node's and valid now, and
/// the key the certificate's.
pub fn check_tls(node: &Loaded, now: i64) -> Findings {
    let mut found = Findings::default();
    let Some(tls) = &node.config.tls else {
        return found;
    };
    let me = &node.config.node.id;
    let mut error = |key: &str, reason: String| {
        found.errors.push(Problem {
            file: node.path.clone(),
            key: key.to_string(),
            reason,
        });
    };
    let mut validity = Vec::new();
    let mut invalid_now = |key: &str, reason: String| {
        validity.push(Problem {
            file: node.path.clone(),
            key: key.to_string(),
            reason,
        });
    };
    let ca_ok = check_cert(&tls.ca, None, now, "tls.ca", &mut error, &mut invalid_now);
    let cert_ok = check_cert(
        &tls.cert,
        Some(me),
        now,
        "tls.cert",
        &mut error,
        &mut invalid_now,
    );
    if let Some(crl) = &tls.crl
        && let Err(e) = certs::read_crl(crl)
    {
        error("tls.crl", e.to_string());
    }
    if !tls.key.exists() {
        error("tls.key", format!("{}: no such file", tls.key.display()));
    } else if let Some(why) = key_mode_problem(&tls.key) {
        error("tls.key", why);
    } else if ca_ok && cert_ok {
        // Building the rustls configuration is what `run` does with them:
        // it refuses an unreadable key and a key that is not the
        // certificate's.
        if let Err(e) = crate::tls::server_config(tls) {
            error("tls.key", e.to_string());
        }
    }
    found.validity = validity;
    for (key, file) in [("tls.ca", &tls.ca), ("tls.cert", &tls.cert)] {
        if let Ok(info) = certs::inspect(file) {
            let days = (info.not_after - now).div_euclid(86_400);
            if info.not_after > now && days < EXPIRY_WARNING_DAYS {
                found.warnings.push(Problem {
                    file: node.path.clone(),
                    key: key.to_string(),
                    reason: format!(
                        "{} expires in {days} day(s), on {}: renew it (then `tiersync reload`)",
                        file.display(),
                        format_time(info.not_after)
                    ),
                });
            }
        }
    }
    found
}

/// Why the key file's mode is unsafe, if it is: a key that its group or
/// others may read (or write) is refused, as ssh refuses such keys.
pub fn key_mode_problem(key: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{} has mode {mode:04o}: others than its owner may read it; run `chmod 600 {}` (a Kubernetes Secret: defaultMode 0400)",
            key.display(),
            key.display()
        )
    })
}

/// Checks one certificate file; `owner` is the node id it must name (`None`:
/// it must be a CA). Returns whether it is usable.
fn check_cert(
    file: &Path,
    owner: Option<&NodeId>,
    now: i64,
    key: &str,
    error: &mut impl FnMut(&str, String),
    invalid_now: &mut impl FnMut(&str, String),
) -> bool {
    if !file.exists() {
        error(key, format!("{}: no such file", file.display()));
        return false;
    }
    let info = match certs::inspect(file) {
        Ok(info) => info,
        Err(e) => {
            error(key, format!("cannot read the certificate: {e}"));
            return false;
        }
    };
    let mut ok = true;
    match owner {
        None if !info.is_ca => {
            error(key, format!("{} is not a CA certificate", file.display()));
            ok = false;
        }
        Some(me) if info.node_id.as_ref() != Some(me) => {
            let whose = info.node_id.map_or_else(
                || "names no node id".to_string(),
                |id| format!("is the certificate of node {id}"),
            );
            error(key, format!("{} {whose}, not {me}", file.display()));
            ok = false;
        }
        _ => {}
    }
    if info.not_after <= now {
        invalid_now(
            key,
            format!(
                "{} expired on {}: renew it (tiersync certs issue --force), then tiersync reload",
                file.display(),
                format_time(info.not_after)
            ),
        );
    } else if info.not_before > now {
        invalid_now(
            key,
            format!(
                "{} is not valid before {} (is this machine's clock right?)",
                file.display(),
                format_time(info.not_before)
            ),
        );
    }
    ok
}

/// The expiry (Unix seconds) of the CA and node certificates, for the
/// expiry gauge; a file that cannot be read is left out.
pub fn expiries(tls: &TlsSection) -> Vec<(&'static str, i64)> {
    [("ca", &tls.ca), ("node", &tls.cert)]
        .into_iter()
        .filter_map(|(which, file)| certs::inspect(file).ok().map(|i| (which, i.not_after)))
        .collect()
}

/// A Unix time as `Nov  5 12:00:00 2027 +00:00`.
pub fn format_time(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("@{secs}"), |t| t.to_string())
}
