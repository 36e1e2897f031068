//! What a request says about itself: the key it carries (and in which
//! header), the one canonical path it is routed on and forwarded with, and
//! which headers never reach the upstream.

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
        bearer = bearer_token(v);
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

/// Why a request's path is refused before routing (400 `bad-path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`, `%5C` or `%2E`: a separator or dot that an upstream which
    /// decodes the path would route differently from Tollgate.
    EncodedSeparator,
    /// A raw `\`, which some upstreams read as `/`.
    Backslash,
    /// A `;` (raw or `%3B`): Java servers strip path parameters before
    /// routing, so `/public/..;/private` or `/v1/sms;/send` would run a
    /// route other than the one matched.
    PathParameter,
    /// A NUL, raw or as `%00`.
    Nul,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// Escapes that do not decode to UTF-8 text.
    NotText,
}

/// A request path in the one form Tollgate routes on and forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath<'a> {
    /// Every escape decoded, repeated slashes merged, `.` and `..` resolved
    /// (RFC 3986 6.2.2 and 5.2.4): what routes and public checks match.
    pub routed: std::borrow::Cow<'a, str>,
    /// What goes upstream when it differs from what the client sent: the
    /// routed path with only the bytes a path cannot hold escaped again,
    /// so an upstream that decodes it reads exactly `routed`.
    pub forward: Option<String>,
}

/// The canonical form of `path` (the request target's path, without its
/// query). Borrowed, with nothing to forward, when the path is already
/// canonical. Encoded separators and dots, NUL, backslashes, broken escapes
/// and escapes that are not UTF-8 are refused: no upstream can then read
/// the path as a route other than the one Tollgate matched.
pub fn canonical_path(path: &str) -> Result<CanonicalPath<'_>, PathError> {
    // `OPTIONS *` (asterisk-form) names no resource: it goes as it came.
    if is_canonical(path.as_bytes()) || path == "*" {
        return Ok(CanonicalPath {
            routed: std::borrow::Cow::Borrowed(path),
            forward: None,
        });
    }
    let b = path.as_bytes();
    if b.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    if b.contains(&b';') {
        return Err(PathError::PathParameter);
    }
    let decoded = percent_decode(b)?;
    let routed = remove_dot_segments(&decoded);
    let forward = encode_path(&routed);
    Ok(CanonicalPath {
        forward: (forward != path).then_some(forward),
        routed: std::borrow::Cow::Owned(routed),
    })
}

/// Bytes a canonical path holds as they are: RFC 3986 `pchar` without `%`
/// and `;` (unreserved, the other sub-delims, `:` and `@`), and `/`.
static PATH_SAFE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
            );
        c += 1;
    }
    t
};

fn path_safe(c: u8) -> bool {
    PATH_SAFE[usize::from(c)]
}

/// One pass over a path: it starts with `/`, holds only safe bytes, and no
/// empty, `.` or `..` segment.
fn is_canonical(b: &[u8]) -> bool {
    if b.first() != Some(&b'/') {
        return false;
    }
    // The current segment's length, and whether it is all dots so far.
    let (mut len, mut dots) = (0usize, true);
    for (i, &c) in b.iter().enumerate() {
        if !path_safe(c) {
            return false;
        }
        if c == b'/' {
            if i > 0 && (len == 0 || (dots && len <= 2)) {
                return false;
            }
            (len, dots) = (0, true);
        } else {
            len += 1;
            dots &= c == b'.';
        }
    }
    !(dots && (1..=2).contains(&len))
}

fn percent_decode(b: &[u8]) -> Result<String, PathError> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            if b[i] == 0 {
                return Err(PathError::Nul);
            }
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = |c: u8| char::from(c).to_digit(16);
        let v = match (
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (Some(h), Some(l)) => (h * 16 + l) as u8,
            _ => return Err(PathError::BadEscape),
        };
        match v {
            b'/' | b'\\' | b'.' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::PathParameter),
            0 => return Err(PathError::Nul),
            _ => out.push(v),
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| PathError::NotText)
}

/// `/` followed by the segments left after `.` and `..` are resolved and
/// empty segments merged; a trailing slash is kept.
fn remove_dot_segments(decoded: &str) -> String {
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
    let mut normal = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if normal.is_empty() || (trailing && !out.is_empty()) {
        normal.push('/');
    }
    normal
}

/// Escapes the bytes a path cannot hold as they are (`%`, `?`, `#`,
/// spaces, controls, non-ASCII).
fn encode_path(routed: &str) -> String {
    crate::pct::encode(routed, path_safe)
}

/// Whether a request header spells `canonical` (lower case, `-`
/// separated) in a way an upstream may fold into it: any case, and `_`
/// for `-` as CGI-style servers read it.
fn spells(name: &str, canonical: &str) -> bool {
    spells_bytes(name.as_bytes(), canonical.as_bytes())
}

fn spells_bytes(name: &[u8], canonical: &[u8]) -> bool {
    name.len() == canonical.len()
        && name.iter().zip(canonical).all(|(&a, &b)| {
            let a = a.to_ascii_lowercase();
            a == b || (a == b'_' && b == b'-')
        })
}

/// Whether a request header claims to be one of Tollgate's identity headers,
/// also in the `X-Tollgate_Customer` spelling CGI-style servers fold into it.
pub fn is_identity_header(name: &str) -> bool {
    let n = name.as_bytes();
    n.len() >= 11 && spells_bytes(&n[..10], b"x-tollgate") && matches!(n[10], b'-' | b'_')
}

/// Headers that never reach the upstream, in any spelling it could fold
/// into the same name: Tollgate's identity headers (only Tollgate asserts
/// them), the key header, and the method-override headers some frameworks
/// honour (a `GET` must not become a `POST` upstream without paying the
/// `POST` route's cost).
pub fn never_forwarded(name: &str) -> bool {
    is_identity_header(name)
        || spells(name, X_API_KEY)
        || spells(name, "x-http-method-override")
        || spells(name, "x-http-method")
        || spells(name, "x-method-override")
}

/// Whether an `Authorization` value carries a Bearer token (compared as
/// bytes, so a value that is not text is still recognised).
pub fn is_bearer(value: &[u8]) -> bool {
    value.len() > 6
        && value[..6].eq_ignore_ascii_case(b"bearer")
        && matches!(value[6], b' ' | b'\t')
}

/// The token of an `Authorization: Bearer <token>` value: the scheme in any
/// case, then any run of spaces or tabs. None for another scheme.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`, and no body. Anything else sent as
/// `OPTIONS` is an ordinary request, authenticated and limited.
pub fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
        && !has_body(headers)
}

/// Whether the request announces a body.
pub fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
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
        let h = headers(&[("authorization", b"Bearer\ttg_abc")]);
        assert_eq!(
            extract_key(&h).unwrap(),
            Some(("tg_abc", KeySource::Bearer)),
            "a tab after Bearer still makes a bearer token"
        );
        // Basic auth is the upstream's business; the key is in X-API-Key.
        let h = headers(&[("authorization", b"Basic dXNlcg=="), ("x-api-key", b"k")]);
        assert_eq!(extract_key(&h).unwrap(), Some(("k", KeySource::ApiKey)));
        assert_eq!(extract_key(&headers(&[])).unwrap(), None);
    }

    #[test]
    fn paths_are_routed_decoded_and_resolved() {
        for (raw, routed, forward) in [
            ("/v1/sms/send", "/v1/sms/send", None),
            ("/v1/%73ms/send", "/v1/sms/send", Some("/v1/sms/send")),
            ("/v1/%41i", "/v1/Ai", Some("/v1/Ai")),
            ("//v1///sms/", "/v1/sms/", Some("/v1/sms/")),
            ("/public/../private", "/private", Some("/private")),
            ("/a/./b/../../c", "/c", Some("/c")),
            ("/../..", "/", Some("/")),
            ("/", "/", None),
            ("*", "*", None),
            ("/a/.../b", "/a/.../b", None),
            ("/a/.b/..c", "/a/.b/..c", None),
            ("/a/.", "/a/", Some("/a/")),
            // Decoded for routing, escaped again where a path needs it.
            ("/v1/caf%C3%A9", "/v1/caf\u{e9}", None),
            ("/a%20b", "/a b", None),
            ("/x%3Fy", "/x?y", None),
            ("/%25", "/%", None),
            ("/a%2Cb", "/a,b", Some("/a,b")),
        ] {
            let c = canonical_path(raw).unwrap();
            assert_eq!(c.routed, routed, "{raw}");
            assert_eq!(c.forward.as_deref(), forward, "{raw}");
        }
        assert!(matches!(
            canonical_path("/v1/x").unwrap().routed,
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn paths_an_upstream_could_route_differently_are_refused() {
        for (raw, why) in [
            ("/v1%2Fsms%2Fsend", PathError::EncodedSeparator),
            ("/v1%2fai%2fchat", PathError::EncodedSeparator),
            ("/docs/..%2fv1%2fsecret", PathError::EncodedSeparator),
            ("/%2e%2e/v1/secret", PathError::EncodedSeparator),
            ("/a%5Cb", PathError::EncodedSeparator),
            ("/public/..;/private", PathError::PathParameter),
            ("/v1/sms;jsessionid=1/send", PathError::PathParameter),
            ("/v1/sms%3b/send", PathError::PathParameter),
            ("/a\\b", PathError::Backslash),
            ("/a%00b", PathError::Nul),
            // Found by fuzzing: a raw NUL was routed, then refused once encoded.
            ("/docs/..%1f\u{1}\0", PathError::Nul),
            ("/x%", PathError::BadEscape),
            ("/x%zz", PathError::BadEscape),
            ("/x%4", PathError::BadEscape),
            ("/a%FFb", PathError::NotText),
        ] {
            assert_eq!(canonical_path(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn bearer_tokens_follow_any_whitespace_and_other_schemes_are_left() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer\tabc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic dXNlcg=="), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn key_and_method_override_headers_never_go_upstream_in_any_spelling() {
        for n in [
            "x-api-key",
            "X_Api_Key",
            "x-api_key",
            "x-http-method-override",
            "X_HTTP_Method_Override",
            "x-http-method",
            "x-method-override",
            "x-tollgate-plan",
        ] {
            assert!(never_forwarded(n), "{n}");
        }
        for n in [
            "x-api-keys",
            "authorization",
            "x-request-id",
            "content-type",
        ] {
            assert!(!never_forwarded(n), "{n}");
        }
    }

    #[test]
    fn only_a_bodiless_options_with_origin_is_a_preflight() {
        let m = http::Method::OPTIONS;
        let pre = [
            ("origin", &b"https://app.example.com"[..]),
            ("access-control-request-method", b"POST"),
        ];
        assert!(is_preflight(&m, &headers(&pre)));
        assert!(!is_preflight(&http::Method::POST, &headers(&pre)));
        assert!(!is_preflight(
            &m,
            &headers(&[("access-control-request-method", b"POST")])
        ));
        let mut with_body = pre.to_vec();
        with_body.push(("content-length", b"5"));
        assert!(!is_preflight(&m, &headers(&with_body)));
        let mut chunked = pre.to_vec();
        chunked.push(("transfer-encoding", b"chunked"));
        assert!(!is_preflight(&m, &headers(&chunked)));
        let mut empty = pre.to_vec();
        empty.push(("content-length", b"0"));
        assert!(is_preflight(&m, &headers(&empty)));
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
