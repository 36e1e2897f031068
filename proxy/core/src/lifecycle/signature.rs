//! Webhook signatures, checked before a byte of the body is parsed. Each
//! provider's scheme is implemented exactly as its documentation defines it;
//! every comparison is constant-time (`Mac::verify_slice`), and every
//! parser takes hostile input (`fuzz` target `signatures`).
//!
//! - Stripe (<https://docs.stripe.com/webhooks#verify-manually>):
//!   `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256 of
//!   `"{t}.{body}"`; any `v1` may match (Stripe sends one per active secret
//!   while one is rolled); other schemes (`v0`) are ignored.
//! - Paystack (<https://paystack.com/docs/payments/webhooks/#verify-event-origin>):
//!   `x-paystack-signature: <hex>`, HMAC-SHA512 of the body keyed with the
//!   secret key. Paystack signs no timestamp.
//! - Paddle Billing (<https://developer.paddle.com/webhooks/signature-verification>):
//!   `Paddle-Signature: ts=<unix>;h1=<hex>[;h1=<hex>…]`, HMAC-SHA256 of
//!   `"{ts}:{body}"`.
//! - Standard Webhooks (<https://www.standardwebhooks.com/>, spec §
//!   "Verifying webhooks"): `webhook-id`, `webhook-timestamp`,
//!   `webhook-signature: v1,<base64> [v1,<base64>…]`, HMAC-SHA256 of
//!   `"{id}.{timestamp}.{body}"` keyed with the base64 part of `whsec_…`.

use std::fmt;

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};

type HmacSha256 = Hmac<Sha256>;
type HmacSha512 = Hmac<Sha512>;

/// At most this many signatures are tried from one header (a header of a
/// thousand `v1`s must not cost a thousand HMACs per secret).
const MAX_SIGNATURES: usize = 8;

/// Why a delivery's signature was refused. Rendered into the 400's detail:
/// it names what was wrong, never a secret or the expected value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// The signature header (named) is absent.
    Missing(&'static str),
    /// The header does not have the provider's shape.
    Malformed(&'static str),
    /// The signed timestamp is further from now than the tolerance.
    Stale { age_secs: i64, tolerance_secs: u64 },
    /// Well-formed, but no signature matches any configured secret.
    Mismatch,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Missing(h) => write!(f, "the {h} header is missing"),
            SignatureError::Malformed(why) => write!(f, "the signature header is malformed: {why}"),
            SignatureError::Stale {
                age_secs,
                tolerance_secs,
            } => write!(
                f,
                "the signed timestamp is {age_secs} s from now, outside the {tolerance_secs} s tolerance (a replay, or a clock that is off)"
            ),
            SignatureError::Mismatch => write!(
                f,
                "no signature matches the configured secret (wrong secret, or a changed body)"
            ),
        }
    }
}

impl std::error::Error for SignatureError {}

fn hmac256(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// A timestamp within `tolerance` of `now`, either side.
fn fresh(ts: u64, now_secs: u64, tolerance_secs: u64) -> Result<(), SignatureError> {
    let age = now_secs as i64 - ts as i64;
    if age.unsigned_abs() > tolerance_secs {
        return Err(SignatureError::Stale {
            age_secs: age,
            tolerance_secs,
        });
    }
    Ok(())
}

fn unix_secs(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `mac` (already fed the signed bytes) checked against each candidate.
fn any_matches<M: Mac + Clone>(mac: &M, candidates: &[Vec<u8>]) -> bool {
    candidates
        .iter()
        .any(|sig| mac.clone().verify_slice(sig).is_ok())
}

/// `t`/`ts` and the hex signatures of a `k=v` list (Stripe: `,`; Paddle: `;`).
fn timestamp_and_hex(
    header: &str,
    sep: char,
    ts_name: &str,
    sig_name: &str,
) -> Result<(u64, Vec<Vec<u8>>), SignatureError> {
    let mut ts = None;
    let mut sigs = Vec::new();
    for item in header.split(sep) {
        let Some((k, v)) = item.trim().split_once('=') else {
            return Err(SignatureError::Malformed("an item is not `name=value`"));
        };
        if k == ts_name {
            if ts.is_some() {
                return Err(SignatureError::Malformed("the timestamp is given twice"));
            }
            ts = Some(unix_secs(v).ok_or(SignatureError::Malformed(
                "the timestamp is not a Unix time",
            ))?);
        } else if k == sig_name && sigs.len() < MAX_SIGNATURES {
            // A signature that is not hex cannot match; it is skipped, as
            // Stripe's libraries compare it as a string and fail it.
            if let Ok(sig) = hex::decode(v) {
                sigs.push(sig);
            }
        }
    }
    let ts = ts.ok_or(SignatureError::Malformed("there is no timestamp"))?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed("there is no signature"));
    }
    Ok((ts, sigs))
}

/// How a provider lays out a timestamped signature header.
struct Scheme {
    header: &'static str,
    /// Between items (`,` Stripe, `;` Paddle).
    sep: char,
    ts: &'static str,
    sig: &'static str,
    /// Between the timestamp and the body in the signed message.
    join: &'static [u8],
}

const STRIPE: Scheme = Scheme {
    header: "Stripe-Signature",
    sep: ',',
    ts: "t",
    sig: "v1",
    join: b".",
};

const PADDLE: Scheme = Scheme {
    header: "Paddle-Signature",
    sep: ';',
    ts: "ts",
    sig: "h1",
    join: b":",
};

/// HMAC-SHA256 of `"{ts}{join}{body}"` against every listed signature;
/// the signed timestamp on success.
fn timestamped(
    scheme: &Scheme,
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<u64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing(scheme.header))?;
    let (ts, sigs) = timestamp_and_hex(header, scheme.sep, scheme.ts, scheme.sig)?;
    let ok = secrets.iter().any(|s| {
        let mut mac = hmac256(s.as_bytes());
        mac.update(ts.to_string().as_bytes());
        mac.update(scheme.join);
        mac.update(body);
        any_matches(&mac, &sigs)
    });
    if !ok {
        return Err(SignatureError::Mismatch);
    }
    fresh(ts, now_secs, tolerance_secs)?;
    Ok(ts)
}

/// Verifies a Stripe delivery; the signed timestamp on success.
pub fn stripe(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<u64, SignatureError> {
    timestamped(&STRIPE, header, body, secrets, now_secs, tolerance_secs)
}

/// Verifies a Paddle Billing delivery; the signed timestamp on success.
pub fn paddle(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<u64, SignatureError> {
    timestamped(&PADDLE, header, body, secrets, now_secs, tolerance_secs)
}

/// Verifies a Paystack delivery (no timestamp is signed).
pub fn paystack(
    header: Option<&str>,
    body: &[u8],
    secrets: &[String],
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing("x-paystack-signature"))?;
    let sig = hex::decode(header.trim())
        .ok()
        .filter(|s| s.len() == 64)
        .ok_or(SignatureError::Malformed("it is not 128 hex digits"))?;
    let ok = secrets.iter().any(|s| {
        let Ok(mut mac) = <HmacSha512 as Mac>::new_from_slice(s.as_bytes()) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The three Standard Webhooks headers of a delivery.
#[derive(Debug, Clone, Copy)]
pub struct StandardHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Verifies a Standard Webhooks delivery; its id and timestamp on success.
pub fn standard<'a>(
    h: StandardHeaders<'a>,
    body: &[u8],
    secrets: &[String],
    now_secs: u64,
    tolerance_secs: u64,
) -> Result<(&'a str, u64), SignatureError> {
    let id = h.id.ok_or(SignatureError::Missing("webhook-id"))?;
    let ts = h
        .timestamp
        .ok_or(SignatureError::Missing("webhook-timestamp"))?;
    let sig = h
        .signature
        .ok_or(SignatureError::Missing("webhook-signature"))?;
    if id.is_empty() || id.len() > 256 {
        return Err(SignatureError::Malformed("webhook-id is empty or too long"));
    }
    let ts_n = unix_secs(ts).ok_or(SignatureError::Malformed(
        "webhook-timestamp is not a Unix time",
    ))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let sigs: Vec<Vec<u8>> = sig
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .take(MAX_SIGNATURES)
        .filter_map(|s| b64.decode(s).ok())
        .collect();
    if sigs.is_empty() {
        return Err(SignatureError::Malformed("there is no v1 signature"));
    }
    let ok = secrets.iter().any(|s| {
        let mut mac = hmac256(&webhook_key(s));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body);
        any_matches(&mac, &sigs)
    });
    if !ok {
        return Err(SignatureError::Mismatch);
    }
    fresh(ts_n, now_secs, tolerance_secs)?;
    Ok((id, ts_n))
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`: what
/// Tollgate's own webhook sink signs its deliveries with.
pub fn standard_webhooks_signature(key: &[u8], id: &str, timestamp: u64, body: &str) -> String {
    let mut mac = hmac256(key);
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// The key of a `whsec_<base64>` secret (a secret without the prefix is
/// decoded as base64 too, falling back to its bytes).
pub fn webhook_key(secret: &str) -> Vec<u8> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_hmac256(key: &str, msg: &str) -> String {
        let mut mac = hmac256(key.as_bytes());
        mac.update(msg.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn standard_webhooks_signature_matches_the_published_test_vector() {
        // The Standard Webhooks specification's reference test vector
        // (standard-webhooks/standard-webhooks, the libraries' tests).
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = standard_webhooks_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let h = StandardHeaders {
            id: Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
            timestamp: Some("1614265330"),
            signature: Some(&sig),
        };
        let secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned()];
        let body = br#"{"test": 2432232314}"#;
        assert!(standard(h, body, &secrets, 1_614_265_330, 300).is_ok());
        assert!(matches!(
            standard(h, body, &secrets, 1_614_265_330 + 301, 300),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            standard(h, b"{\"test\": 1}", &secrets, 1_614_265_330, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn stripe_accepts_any_matching_v1_and_refuses_the_rest() {
        let body = br#"{"id":"evt_1"}"#;
        let good = hex_hmac256("whsec_a", &format!("{NOW}.{{\"id\":\"evt_1\"}}"));
        let secrets = ["whsec_a".to_owned()];
        let header = format!("t={NOW},v1={},v1={good},v0=00", "ab".repeat(32));
        assert_eq!(stripe(Some(&header), body, &secrets, NOW, 300), Ok(NOW));
        // Rotation: the old secret configured beside the new one.
        let two = ["whsec_new".to_owned(), "whsec_a".to_owned()];
        assert!(stripe(Some(&header), body, &two, NOW, 300).is_ok());
        assert_eq!(
            stripe(Some(&header), body, &["whsec_b".to_owned()], NOW, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            stripe(Some(&header), body, &secrets, NOW + 301, 300),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            stripe(None, body, &secrets, NOW, 300),
            Err(SignatureError::Missing("Stripe-Signature"))
        );
        for bad in [
            "",
            "t=1",
            &format!("v1={good}"),
            "t=x,v1=00",
            "garbage",
            &format!("t=1,t=2,v1={good}"),
        ] {
            assert!(
                matches!(
                    stripe(Some(bad), body, &secrets, NOW, 300),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn paddle_signs_ts_colon_body() {
        let body = br#"{"event_id":"evt_01"}"#;
        let h1 = hex_hmac256(
            "pdl_ntfset_x",
            &format!("{NOW}:{{\"event_id\":\"evt_01\"}}"),
        );
        let secrets = ["pdl_ntfset_x".to_owned()];
        let header = format!("ts={NOW};h1={h1}");
        assert_eq!(paddle(Some(&header), body, &secrets, NOW, 300), Ok(NOW));
        // A Stripe-style `.` separator is a different message.
        let dot = hex_hmac256(
            "pdl_ntfset_x",
            &format!("{NOW}.{{\"event_id\":\"evt_01\"}}"),
        );
        assert_eq!(
            paddle(
                Some(&format!("ts={NOW};h1={dot}")),
                body,
                &secrets,
                NOW,
                300
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn paystack_is_hmac_sha512_of_the_body() {
        let body = br#"{"event":"charge.success"}"#;
        let mut mac = <HmacSha512 as Mac>::new_from_slice(b"sk_test_x").unwrap();
        mac.update(body);
        let sig = hex::encode(mac.finalize().into_bytes());
        let secrets = ["sk_test_x".to_owned()];
        assert_eq!(paystack(Some(&sig), body, &secrets), Ok(()));
        assert_eq!(
            paystack(Some(&sig), b"{}", &secrets),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            paystack(Some("abc"), body, &secrets),
            Err(SignatureError::Malformed(_))
        ));
    }
}
