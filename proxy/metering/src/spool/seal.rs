//! Optional sealing of the spool's files at rest (`metering.encryption`):
//! each line of `events.log`, `records.log`, `acks-*.log` and
//! `dead-*.jsonl` is written as `~` and the base64 of a fresh 96-bit nonce
//! and its AES-256-GCM ciphertext. A line that opens with neither key is
//! torn (a crash mid-write) and ignored, as a line with a bad CRC is; a key
//! that does not fit the spool at all is caught at open by `key-check`.
//!
//! Rotation: start with the new key as `key_env` and the old one as
//! `previous_key_env`. Opening the spool rewrites what it still owes under
//! the new key; dead-letter files keep their lines, so keep the previous
//! key while they matter.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;

use super::SpoolError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// The spool's keys: the one new lines are sealed with, and the one being
/// rotated away from.
pub struct Seal {
    current: Aes256Gcm,
    previous: Option<Aes256Gcm>,
}

impl fmt::Debug for Seal {
    // Keys stay out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seal(rotating: {})", self.previous.is_some())
    }
}

/// A 256-bit key written as 64 hex digits or as base64 (as `openssl rand
/// -base64 32` prints it).
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let mut key = [0u8; 32];
    if hex::decode_to_slice(text, &mut key).is_ok() {
        return Some(key);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    key.copy_from_slice(bytes.get(..32).filter(|_| bytes.len() == 32)?);
    Some(key)
}

impl Seal {
    pub fn new(current: &[u8; 32], previous: Option<&[u8; 32]>) -> Self {
        Self {
            current: Aes256Gcm::new(current.into()),
            previous: previous.map(|k| Aes256Gcm::new(k.into())),
        }
    }

    /// Every line of `text` sealed (each ends in `\n`).
    pub fn seal(&self, text: &str) -> Result<String, SpoolError> {
        let mut out = String::with_capacity(text.len() * 2);
        for line in text.lines() {
            let mut nonce = [0u8; 12];
            tollgate_core::keys::random_bytes(&mut nonce).map_err(SpoolError::Thread)?;
            let sealed = self
                .current
                .encrypt(Nonce::from_slice(&nonce), line.as_bytes())
                .map_err(|_| SpoolError::Seal("cannot seal a line"))?;
            let mut raw = Vec::with_capacity(12 + sealed.len());
            raw.extend_from_slice(&nonce);
            raw.extend_from_slice(&sealed);
            out.push('~');
            B64.encode_string(&raw, &mut out);
            out.push('\n');
        }
        Ok(out)
    }

    /// A line as it was written: sealed lines opened (with the current
    /// key, else the previous one), plain lines (written before sealing was
    /// turned on) as they are. None: it opens with neither key.
    pub fn open(&self, line: &str) -> Option<String> {
        let Some(sealed) = line.strip_prefix('~') else {
            return Some(line.to_owned());
        };
        let raw = B64.decode(sealed).ok()?;
        let (nonce, text) = (raw.get(..12)?, raw.get(12..)?);
        let plain = self
            .current
            .decrypt(Nonce::from_slice(nonce), text)
            .or_else(|e| match &self.previous {
                Some(p) => p.decrypt(Nonce::from_slice(nonce), text),
                None => Err(e),
            })
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

/// What `key-check` holds, sealed.
pub const KEY_CHECK: &str = "tollgate spool key check";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_other_keys_open_nothing() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let seal = Seal::new(&a, None);
        let text = seal
            .seal("E 1 2 cus api 1 abcd\nE 2 3 cus api 1 ef01\n")
            .unwrap();
        assert!(!text.contains("cus"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(seal.open(lines[0]).as_deref(), Some("E 1 2 cus api 1 abcd"));
        assert_eq!(Seal::new(&b, None).open(lines[0]), None, "another key");
        // Rotating: the new key seals, the old one still opens.
        let rotated = Seal::new(&b, Some(&a));
        assert_eq!(
            rotated.open(lines[1]).as_deref(),
            Some("E 2 3 cus api 1 ef01")
        );
        // A torn line opens with no key; a plain one is read as it is.
        assert_eq!(seal.open(&lines[0][..lines[0].len() - 3]), None);
        assert_eq!(seal.open("H 7 0000").as_deref(), Some("H 7 0000"));
    }

    #[test]
    fn keys_are_hex_or_base64_of_32_bytes() {
        assert_eq!(parse_key(&"ab".repeat(32)), Some([0xab; 32]));
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(parse_key(&b64), Some([7; 32]));
        assert_eq!(parse_key("short"), None);
        assert_eq!(parse_key(&"ab".repeat(31)), None);
    }
}
