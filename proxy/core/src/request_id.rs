//! `X-Request-Id`: the client's when it is usable (1-128 visible ASCII
//! characters), else a fresh UUIDv7 (time-ordered, RFC 9562), so a line of
//! the access log, the upstream's logs and the id a consumer quotes from a
//! problem body all name the same request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use crate::clock::Millis;

pub const HEADER: &str = "x-request-id";

/// The client's id, when it is 1-128 visible ASCII characters.
pub fn accept(value: Option<&[u8]>) -> Option<&str> {
    let v = value?;
    let ok = !v.is_empty() && v.len() <= 128 && v.iter().all(|b| (0x21..=0x7e).contains(b));
    if ok {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Random bits drawn once per process; ids are then told apart by a
/// counter, so generating one is a few arithmetic operations, no syscall.
static SEED: LazyLock<u64> = LazyLock::new(|| {
    let mut b = [0u8; 8];
    // Without randomness the counter alone still keeps ids unique.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
});
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A UUIDv7 for a request at `now`.
pub fn generate(now: Millis) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // 74 bits after the timestamp: 12 of the counter's low bits, then the
    // seed mixed with the whole counter (unique per process and id).
    let mixed = SEED.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let ts = now & 0xFFFF_FFFF_FFFF;
    let rand_a = (n & 0x0FFF) as u16;
    let hi: u64 = (ts << 16) | 0x7000 | u64::from(rand_a);
    let lo: u64 = (mixed & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
    // Written digit by digit: `format!` with five padded hex fields costs
    // more than the rest of the id (benches/README.md, callgrind).
    let bytes = (u128::from(hi) << 64 | u128::from(lo)).to_be_bytes();
    let mut out = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[at] = b'-';
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xF)];
        at += 2;
    }
    // ASCII by construction.
    std::str::from_utf8(&out)
        .map(str::to_owned)
        .unwrap_or_default()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_taken_only_when_usable() {
        assert_eq!(accept(Some(b"req-123")), Some("req-123"));
        assert_eq!(accept(Some(&[b'a'; 128])), Some(&*"a".repeat(128)));
        for bad in [
            &b""[..],
            &[b'a'; 129],
            b"has space",
            b"tab\t",
            b"nul\0",
            "é".as_bytes(),
        ] {
            assert_eq!(accept(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(accept(None), None);
    }

    #[test]
    fn generated_ids_are_uuid_v7_and_unique() {
        let t = 1_796_000_000_123;
        let a = generate(t);
        let b = generate(t);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('7'), "version 7: {a}");
        assert!(
            matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "variant: {a}"
        );
        // The timestamp is the first 48 bits.
        let ts = u64::from_str_radix(&format!("{}{}", parts[0], parts[1]), 16).unwrap();
        assert_eq!(ts, t);
        assert!(accept(Some(a.as_bytes())).is_some());
    }
}
