//! Object IDs and name validation.

use crate::{Error, Result};
use rand::RngCore;

/// A new 64-hex-character ID, like containerd's CRI plugin generates.
pub fn new_id() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Rejects IDs that could escape a directory or confuse containerd.
pub fn validate_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} must not be empty")));
    }
    if id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id.starts_with('.')
    {
        return Err(Error::InvalidArgument(format!(
            "{field} {id:?} is not a valid ID (letters, digits, '-', '_', '.' only)"
        )));
    }
    Ok(())
}

/// Nanoseconds since the Unix epoch, the unit of every CRI timestamp.
pub fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn validate_rejects_traversal() {
        assert!(validate_id("id", "abc-1").is_ok());
        assert!(validate_id("id", "").is_err());
        assert!(validate_id("id", "../etc").is_err());
        assert!(validate_id("id", "a/b").is_err());
        assert!(validate_id("id", ".hidden").is_err());
    }
}
