//! Field values.
//!
//! A closed, totally ordered set of value types, so that two registers with the
//! same stamp but different values (which only a bug or a forged frame can
//! produce) still resolve to the same winner everywhere.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// A field's value. Nested JSON objects and arrays are kept as their canonical
/// JSON text in [`Value::Json`]; a removed field is `None` in its register,
/// so there is no null variant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Value {
    /// `true` / `false`.
    Bool(bool),
    /// A whole number that fits in 64 bits.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// Text.
    Str(String),
    /// A nested object or array, as canonical JSON text.
    Json(String),
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Bool(_) => 0,
            Value::Int(_) => 1,
            Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Json(_) => 4,
        }
    }

    /// The value as a number, for sums.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The value as text, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Str(a), Value::Str(b)) | (Value::Json(a), Value::Json(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_total_even_for_nan() {
        let nan = Value::Float(f64::NAN);
        assert_eq!(nan, nan.clone());
        assert!(Value::Bool(true) < Value::Int(0));
        assert!(Value::Int(5) < Value::Float(-1.0));
        assert!(Value::Str("b".into()) > Value::Str("a".into()));
    }
}
