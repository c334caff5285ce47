//! Node identities and tiers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest node id accepted: ids travel in certificates, keys and metrics labels.
pub const MAX_NODE_ID_LEN: usize = 64;

/// A node's identity: lowercase ASCII letters, digits, `-` and `_`, 1 to 64
/// characters. The same string names the node in configs, certificates (SAN)
/// and stamps.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// Why a string is not a valid node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("node id is empty")]
    Empty,
    /// The id is longer than [`MAX_NODE_ID_LEN`].
    #[error("node id {0:?} is longer than {MAX_NODE_ID_LEN} characters")]
    TooLong(String),
    /// The id has a character outside `[a-z0-9_-]`.
    #[error("node id {0:?} may contain only lowercase letters, digits, '-' and '_'")]
    BadChar(String),
}

impl NodeId {
    /// Validates and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(IdError::Empty);
        }
        if id.len() > MAX_NODE_ID_LEN {
            return Err(IdError::TooLong(id));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(IdError::BadChar(id));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A node's level in the hierarchy. Ordered: `City < Province < National`;
/// a parent's tier is always above its children's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// Runs the complete local CRM; owns private data.
    City,
    /// Concentrates the shared data of its cities.
    Province,
    /// Sees everything shared from every province.
    National,
}

impl Tier {
    /// The lowercase name used in configs and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::City => "city",
            Tier::Province => "province",
            Tier::National => "national",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(NodeId::new("hangzhou-1").is_ok());
        assert_eq!(NodeId::new(""), Err(IdError::Empty));
        assert!(matches!(NodeId::new("Hangzhou"), Err(IdError::BadChar(_))));
        assert!(matches!(NodeId::new("a b"), Err(IdError::BadChar(_))));
        assert!(matches!(
            NodeId::new("x".repeat(65)),
            Err(IdError::TooLong(_))
        ));
    }

    #[test]
    fn tiers_are_ordered() {
        assert!(Tier::City < Tier::Province && Tier::Province < Tier::National);
    }
}
