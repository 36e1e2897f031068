//! Percent-encoding, the one copy: query strings and form bodies (RFC 3986
//! unreserved characters kept), and the spool's line format.

/// Escapes every byte `keep` rejects as `%XX`.
pub fn encode(s: &str, keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(&mut out, s, keep);
    out
}

/// [`encode`], appending to `out`.
pub fn encode_into(out: &mut String, s: &str, keep: impl Fn(u8) -> bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// RFC 3986 unreserved: letters, digits, `-._~`.
pub fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set); a `%`
/// not followed by two hex digits stays as it is.
pub fn decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) if plus => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_stray_percent_signs() {
        let s = "cus 1&x=[y]%";
        assert_eq!(encode(s, unreserved), "cus%201%26x%3D%5By%5D%25");
        assert_eq!(decode(&encode(s, unreserved), false), s);
        assert_eq!(decode("a+b%zz%4", true), "a b%zz%4");
        assert_eq!(decode("a+b", false), "a+b");
    }
}
