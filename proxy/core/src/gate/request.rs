//! What a request says about itself: the key it carries (and in which
//! header), the path it is routed on, and which headers claim an identity
//! only Tollgate may assert.

use http::header::{HeaderMap, AUTHORIZATION};

use crate::keys;
use crate::problem::Rejection;

pub const X_API_KEY: &str = "x-api-key";

/// Which request header(s) carried the key; those are removed upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Bearer,
    ApiKey,
    /// The same key in both headers.
    Both,
}

/// Finds the API key among the request headers without allocating.
/// `Ok(None)`: no key at all.
pub fn extract_key(headers: &HeaderMap) -> Result<Option<(&str, KeySource)>, Rejection> {
    let mut bearer = None;
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    if let Some(v) = auth.next() {
        if auth.next().is_some() {
            return Err(Rejection::AmbiguousKey);
        }
        let v = v.to_str().map_err(|_| Rejection::MalformedKey)?;
        // Another scheme (e.g. Basic for the upstream) is not ours; leave it.
        if let Some((scheme, token)) = v.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                bearer = Some(token.trim());
            }
        }
    }
    let mut api = headers.get_all(X_API_KEY).iter();
    let api_key = match api.next() {
        Some(v) => {
            if api.next().is_some() {
                return Err(Rejection::AmbiguousKey);
            }
            Some(v.to_str().map_err(|_| Rejection::MalformedKey)?.trim())
        }
        None => None,
    };
    Ok(match (bearer, api_key) {
        (None, None) => None,
        (Some(b), None) => Some((b, KeySource::Bearer)),
        (None, Some(a)) => Some((a, KeySource::ApiKey)),
        (Some(b), Some(a)) if keys::hashes_equal(&keys::hash(a), &keys::hash(b)) => {
            Some((b, KeySource::Both))
        }
        (Some(_), Some(_)) => return Err(Rejection::AmbiguousKey),
    })
}

/// The path routes are matched on: percent-escapes of unreserved characters
/// decoded, repeated slashes merged, `.` and `..` segments resolved (RFC 3986
/// 6.2.2). Matching the raw path would let `/v1/%73ms/send` or
/// `/public/../private` be routed differently from how the upstream reads
/// them. Borrowed when the path is already normal.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    let b = path.as_bytes();
    let needs = b.windows(2).any(|w| w == b"//")
        || b.contains(&b'%')
        || path.split('/').any(|seg| seg == "." || seg == "..");
    if !needs {
        return std::borrow::Cow::Borrowed(path);
    }
    // Decode escapes of unreserved characters only.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(char::from(v));
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(char::from(b[i]));
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if normal.is_empty() || (trailing && !out.is_empty()) {
        normal.push('/');
    }
    std::borrow::Cow::Owned(normal)
}

/// Whether a request header claims to be one of Tollgate's identity headers,
/// also in the `X-Tollgate_Customer` spelling CGI-style servers fold into it.
pub fn is_identity_header(name: &str) -> bool {
    let n = name.as_bytes();
    n.len() >= 11
        && n[..10].iter().zip(b"x-tollgate").all(|(a, b)| {
            let a = a.to_ascii_lowercase();
            a == *b || (a == b'_' && *b == b'-')
        })
        && (n[10] == b'-' || n[10] == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn keys_come_from_bearer_or_x_api_key() {
        let h = headers(&[("authorization", b"Bearer tg_abc")]);
        assert_eq!(
            extract_key(&h).unwrap(),
            Some(("tg_abc", KeySource::Bearer))
        );
        let h = headers(&[("authorization", b"bearer  tg_abc ")]);
        assert_eq!(
            extract_key(&h).unwrap(),
            Some(("tg_abc", KeySource::Bearer))
        );
        let h = headers(&[("x-api-key", b"tg_abc")]);
        assert_eq!(
            extract_key(&h).unwrap(),
            Some(("tg_abc", KeySource::ApiKey))
        );
        let h = headers(&[("authorization", b"Bearer k"), ("x-api-key", b"k")]);
        assert_eq!(extract_key(&h).unwrap(), Some(("k", KeySource::Both)));
        // Basic auth is the upstream's business; the key is in X-API-Key.
        let h = headers(&[("authorization", b"Basic dXNlcg=="), ("x-api-key", b"k")]);
        assert_eq!(extract_key(&h).unwrap(), Some(("k", KeySource::ApiKey)));
        assert_eq!(extract_key(&headers(&[])).unwrap(), None);
    }

    #[test]
    fn paths_are_normalised_before_routing() {
        for (raw, normal) in [
            ("/v1/sms/send", "/v1/sms/send"),
            ("/v1/%73ms/send", "/v1/sms/send"),
            ("/v1/%41i", "/v1/Ai"),
            ("//v1///sms/", "/v1/sms/"),
            ("/public/../private", "/private"),
            ("/a/./b/../../c", "/c"),
            ("/../..", "/"),
            ("/x/%2F/y", "/x/%2F/y"),
            ("/x%", "/x%"),
            ("/", "/"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
        assert!(matches!(
            normalize_path("/v1/x"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn identity_headers_are_recognised_in_every_spelling() {
        for n in [
            "x-tollgate-customer",
            "X-Tollgate_Customer",
            "x_tollgate_plan",
            "X-TOLLGATE-KEY-ID",
        ] {
            assert!(is_identity_header(n), "{n}");
        }
        for n in [
            "x-tollgatecustomer",
            "x-api-key",
            "x-tollgat",
            "tollgate-customer",
        ] {
            assert!(!is_identity_header(n), "{n}");
        }
    }

    #[test]
    fn conflicting_repeated_or_binary_keys_are_refused() {
        let h = headers(&[("authorization", b"Bearer a"), ("x-api-key", b"b")]);
        assert_eq!(extract_key(&h), Err(Rejection::AmbiguousKey));
        let h = headers(&[("x-api-key", b"a"), ("x-api-key", b"a")]);
        assert_eq!(extract_key(&h), Err(Rejection::AmbiguousKey));
        let h = headers(&[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer a"),
        ]);
        assert_eq!(extract_key(&h), Err(Rejection::AmbiguousKey));
        let h = headers(&[("x-api-key", b"\xff\xfe")]);
        assert_eq!(extract_key(&h), Err(Rejection::MalformedKey));
    }
}
