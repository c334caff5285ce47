//! API bearer tokens, kept durably in their own column family (`tokens`).
//!
//! Only the token's salted hash is stored, never the token: a copy of the
//! data directory does not hand out credentials. Tokens are this node's own:
//! they never enter the changelog, so they never replicate, and a token is
//! valid only at the node that issued it. Every change is one synced put,
//! so a revocation is durable before it is acknowledged and the next
//! request (which reads this column family) already sees it.

use std::fmt;
use std::str::FromStr;

use rocksdb::IteratorMode;
use serde::{Deserialize, Serialize};

use super::keys::CF_TOKENS;
use super::{Store, StoreError, decode, encode, sync_opts};

/// Most tokens [`Store::tokens`] lists (a node needs a handful).
pub const MAX_LISTED_TOKENS: usize = 10_000;

/// What a token may do (see the README, Security).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A city's CRM apps and staff: read and write every category at this
    /// node, private ones included.
    Operator,
    /// HQ: shared categories, the customer view (shared items only) and
    /// aggregates; never a private item.
    Analyst,
    /// Ops: status, tokens, metrics; no data.
    Admin,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 3] = [Role::Operator, Role::Analyst, Role::Admin];

    /// The role's name: `operator`, `analyst` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Analyst => "analyst",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: operator, analyst or admin"))
    }
}

/// One token as the node keeps it: no secret, only its salted hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    /// Public id (the part of the token before the secret), 16 hex digits.
    pub id: String,
    /// Who holds it (shown in the audit log).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// If set, the only categories it may touch.
    pub categories: Option<Vec<String>>,
    /// Random salt of the hash.
    pub salt: Vec<u8>,
    /// SHA-256 of salt and secret.
    pub hash: Vec<u8>,
    /// When it was created (ms since the epoch).
    pub created_ms: u64,
    /// When it was revoked, if it was.
    pub revoked_ms: Option<u64>,
}

impl StoredToken {
    /// Whether it is still valid.
    pub fn active(&self) -> bool {
        self.revoked_ms.is_none()
    }
}

impl Store {
    /// Stores a new token (synced before it returns).
    pub fn token_insert(&self, token: &StoredToken) -> Result<(), StoreError> {
        self.db.put_cf_opt(
            self.cf(CF_TOKENS)?,
            token.id.as_bytes(),
            encode(CF_TOKENS, token)?,
            &sync_opts(),
        )?;
        Ok(())
    }

    /// The token with public id `id`, revoked or not.
    pub fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        self.db
            .get_pinned_cf(self.cf(CF_TOKENS)?, id.as_bytes())?
            .map(|b| decode(CF_TOKENS, &b))
            .transpose()
    }

    /// Every token (revoked ones included), by id, at most
    /// [`MAX_LISTED_TOKENS`].
    pub fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .db
            .iterator_cf(self.cf(CF_TOKENS)?, IteratorMode::Start)
            .take(MAX_LISTED_TOKENS)
        {
            let (_, v) = kv?;
            out.push(decode(CF_TOKENS, &v)?);
        }
        Ok(out)
    }

    /// Marks token `id` revoked at `now_ms` (synced); `None` if there is no
    /// such token. Revoking a revoked token keeps its first revocation time.
    pub fn token_revoke(&self, id: &str, now_ms: u64) -> Result<Option<StoredToken>, StoreError> {
        let Some(mut token) = self.token(id)? else {
            return Ok(None);
        };
        if token.revoked_ms.is_none() {
            token.revoked_ms = Some(now_ms);
            self.token_insert(&token)?;
        }
        Ok(Some(token))
    }

    /// Whether any admin token is still valid.
    pub fn has_active_admin(&self) -> Result<bool, StoreError> {
        Ok(self
            .tokens()?
            .iter()
            .any(|t| t.active() && t.role == Role::Admin))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tiersync_protocol::NodeId;

    use super::*;
    use crate::config::Durability;
    use crate::store::tests::policy;

    fn token(id: &str, role: Role) -> StoredToken {
        StoredToken {
            id: id.into(),
            name: format!("n-{id}"),
            role,
            categories: Some(vec!["customer".into()]),
            salt: vec![1; 16],
            hash: vec![2; 32],
            created_ms: 5,
            revoked_ms: None,
        }
    }

    #[test]
    fn tokens_survive_reopen_and_revocation_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy();
        let id = NodeId::new("city-a").unwrap();
        {
            let s = Store::open(dir.path(), id.clone(), policy.clone(), Durability::Fsync).unwrap();
            assert!(!s.has_active_admin().unwrap());
            s.token_insert(&token("a1", Role::Admin)).unwrap();
            s.token_insert(&token("o1", Role::Operator)).unwrap();
            assert!(s.has_active_admin().unwrap());
            let revoked = s.token_revoke("a1", 9).unwrap().unwrap();
            assert_eq!(revoked.revoked_ms, Some(9));
            // A second revocation keeps the first time.
            assert_eq!(
                s.token_revoke("a1", 11).unwrap().unwrap().revoked_ms,
                Some(9)
            );
            assert!(s.token_revoke("nope", 9).unwrap().is_none());
        }
        let s = Store::open(dir.path(), id, policy, Durability::Fsync).unwrap();
        assert!(!s.has_active_admin().unwrap());
        let all = s.tokens().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.token("o1").unwrap().unwrap(), token("o1", Role::Operator));
    }

    #[test]
    fn roles_parse_and_print() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("operator"));
    }
}
