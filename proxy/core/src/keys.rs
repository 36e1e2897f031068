//! API key format: `<prefix><43 base62 chars of 32 random bytes><6-char checksum>`.
//!
//! The checksum is the CRC-32 of prefix and body in 6 base62 digits (the
//! scheme GitHub uses for its tokens), so a mistyped or invented key is
//! rejected before any store lookup and secret scanners can recognise keys.
//! Only the SHA-256 of the whole key is ever stored.

use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Base62 digits needed for 256 bits: 62^43 > 2^256.
pub const BODY_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = 6;
/// Longest prefix accepted in config; keeps keys well under header limits.
pub const MAX_PREFIX_LEN: usize = 32;

/// The SHA-256 of a whole key: the only form in which keys are stored.
pub type KeyHash = [u8; 32];

/// Why a presented key was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Prefix,
    Length,
    Alphabet,
    Checksum,
}

/// Checks a prefix is usable: 1..=32 chars of `[A-Za-z0-9_-]`.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Fills `out` with bytes from the operating system's CSPRNG.
pub fn random_bytes(out: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(out).map_err(|e| std::io::Error::other(e.to_string()))
}

/// Big-endian base62 of `bytes`, left-padded with '0' to `width` digits.
fn base62(bytes: &[u8], width: usize) -> String {
    let mut num: Vec<u8> = bytes.to_vec();
    let mut digits = Vec::with_capacity(width);
    while num.iter().any(|&b| b != 0) {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8_lossy(&digits).into_owned()
}

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}
static CRC_TABLE: [u32; 256] = crc32_table();

/// CRC-32 (IEEE) as used by zip and PNG.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn checksum_digits(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Creates a new raw key with the given prefix from 32 bytes of OS randomness.
pub fn generate(prefix: &str) -> std::io::Result<String> {
    let mut secret = [0u8; 32];
    random_bytes(&mut secret)?;
    Ok(from_secret(prefix, &secret))
}

/// The key for given secret bytes (deterministic; used by `generate` and tests).
pub fn from_secret(prefix: &str, secret: &[u8; 32]) -> String {
    let mut key = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
    key.push_str(prefix);
    key.push_str(&base62(secret, BODY_LEN));
    let sum = checksum_digits(key.as_bytes());
    key.push_str(&String::from_utf8_lossy(&sum));
    key
}

/// Checks prefix, length, alphabet and checksum; no allocation, no lookup.
pub fn check_format(prefix: &str, key: &str) -> Result<(), Malformed> {
    let bytes = key.as_bytes();
    if bytes.len() != prefix.len() + BODY_LEN + CHECKSUM_LEN {
        // Wrong length with the right prefix is a length error; otherwise prefix.
        return Err(if key.starts_with(prefix) {
            Malformed::Length
        } else {
            Malformed::Prefix
        });
    }
    if !key.starts_with(prefix) {
        return Err(Malformed::Prefix);
    }
    let rest = &bytes[prefix.len()..];
    if !rest.iter().all(|&b| is_base62(b)) {
        return Err(Malformed::Alphabet);
    }
    let (head, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum_digits(head) != sum {
        return Err(Malformed::Checksum);
    }
    Ok(())
}

/// SHA-256 of the whole key.
pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two hashes: the time taken does not depend on
/// where they differ.
pub fn hashes_equal(a: &KeyHash, b: &KeyHash) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// A new key id: `key_` and 16 base62 characters.
pub fn new_key_id() -> std::io::Result<String> {
    let mut raw = [0u8; 12];
    random_bytes(&mut raw)?;
    let digits = base62(&raw, 17);
    // 12 bytes need up to 17 digits; keep the last 16 (uniform enough, ~95 bits).
    Ok(format!("key_{}", &digits[digits.len() - 16..]))
}

/// Checks a key id has the `key_` + 16 base62 shape.
pub fn valid_key_id(id: &str) -> bool {
    id.len() == 20 && id.starts_with("key_") && id.as_bytes()[4..].iter().all(|&b| is_base62(b))
}

/// What `keys list` may show of a key: its prefix and first 4 body characters.
pub fn display_prefix(prefix: &str, key: &str) -> String {
    let end = (prefix.len() + 4).min(key.len());
    format!("{}…", key.get(..end).unwrap_or(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = generate("tg_live_").unwrap();
        assert_eq!(key.len(), 8 + BODY_LEN + CHECKSUM_LEN);
        assert!(key.starts_with("tg_live_"));
        assert!(key[8..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(check_format("tg_live_", &key), Ok(()));
        assert_ne!(generate("tg_live_").unwrap(), key, "keys must be random");
    }

    #[test]
    fn base62_is_big_endian_and_padded() {
        assert_eq!(base62(&[0], 3), "000");
        assert_eq!(base62(&[61], 1), "z");
        assert_eq!(base62(&[1, 0], 2), "48"); // 256 = 4*62 + 8
        assert_eq!(base62(&[0xff; 32], 43).len(), 43);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value for "123456789".
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn malformed_keys_are_classified_without_lookup() {
        let key = from_secret("sk_live_", &[7u8; 32]);
        assert_eq!(check_format("sk_live_", &key), Ok(()));
        assert_eq!(check_format("tg_live_", &key), Err(Malformed::Prefix));
        assert_eq!(
            check_format("sk_live_", &key[..key.len() - 1]),
            Err(Malformed::Length)
        );
        let mut bad = key.clone();
        bad.replace_range(10..11, "-");
        assert_eq!(check_format("sk_live_", &bad), Err(Malformed::Alphabet));
        // Flip one body character: checksum catches it.
        let mut flipped = key.into_bytes();
        flipped[12] = if flipped[12] == b'a' { b'b' } else { b'a' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(check_format("sk_live_", &flipped), Err(Malformed::Checksum));
    }

    #[test]
    fn hash_is_sha256_hex_of_the_whole_key() {
        assert_eq!(
            hex::encode(hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let a = hash("x");
        let mut b = a;
        assert!(hashes_equal(&a, &b));
        b[31] ^= 1;
        assert!(!hashes_equal(&a, &b));
    }

    #[test]
    fn key_ids_and_prefixes() {
        let id = new_key_id().unwrap();
        assert!(valid_key_id(&id), "{id}");
        assert!(!valid_key_id("key_short"));
        assert!(valid_prefix("sk_live_"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("bad prefix"));
        assert_eq!(display_prefix("tg_", "tg_abcdefgh"), "tg_abcd…");
    }
}
