//! JWT bearer tokens beside API keys (`auth.jwt`): the issuer is chosen by
//! the token's `iss`, then its signature, `alg`, `aud`, `exp` and `nbf` are
//! checked by the `jsonwebtoken` crate against that issuer's keys and
//! algorithms only. No I/O here: a `jwks_url` issuer's key set is replaced
//! by the gateway's fetcher through [`Issuer::set_jwks`], and an unknown
//! `kid` only raises [`Issuer::wants_refresh`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::sync::{read, write};

/// Tokens longer than this are refused before anything is decoded.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// A key set's usable keys, by `kid`.
pub type KeySet = Arc<Vec<(Option<String>, DecodingKey)>>;

/// Where an issuer's verification keys come from.
pub enum Keys {
    /// HS256/384/512 with a shared secret.
    Secret(DecodingKey),
    /// A PEM public key.
    Pem(DecodingKey),
    /// A JWK set (a file, or fetched from `jwks_url`); empty until fetched.
    Jwks(RwLock<KeySet>),
}

/// One trusted issuer, validated by the config.
pub struct Issuer {
    /// Names the issuer in `X-Tollgate-Key-Id: jwt:<name>` and metrics.
    pub name: Arc<str>,
    pub iss: String,
    pub audience: Vec<String>,
    /// The only algorithms its tokens may use.
    pub algorithms: Vec<Algorithm>,
    pub keys: Keys,
    pub customer_claim: String,
    pub plan_claim: Option<String>,
    pub leeway_secs: u64,
    /// A token named a `kid` the set lacks: the fetcher should look again.
    refresh: AtomicBool,
}

impl Issuer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: Arc<str>,
        iss: String,
        audience: Vec<String>,
        algorithms: Vec<Algorithm>,
        keys: Keys,
        customer_claim: String,
        plan_claim: Option<String>,
        leeway_secs: u64,
    ) -> Self {
        Self {
            name,
            iss,
            audience,
            algorithms,
            keys,
            customer_claim,
            plan_claim,
            leeway_secs,
            refresh: AtomicBool::new(false),
        }
    }

    /// Replaces the key set with the usable keys of `set`; their number
    /// (0: nothing usable, and the previous set stays).
    pub fn set_jwks(&self, set: &JwkSet) -> usize {
        let Keys::Jwks(keys) = &self.keys else {
            return 0;
        };
        // Signing keys only, and of an algorithm this issuer allows when
        // the key names one (an IdP publishes encryption keys beside them).
        let usable: Vec<(Option<String>, DecodingKey)> = set
            .keys
            .iter()
            .filter(|k| {
                !matches!(
                    k.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                )
            })
            .filter(|k| {
                k.common.key_algorithm.is_none_or(|a| {
                    a.to_string()
                        .parse::<Algorithm>()
                        .is_ok_and(|a| self.algorithms.contains(&a))
                })
            })
            .filter_map(|k| Some((k.common.key_id.clone(), DecodingKey::from_jwk(k).ok()?)))
            .collect();
        let n = usable.len();
        // A set with nothing usable keeps the last good one.
        if n == 0 {
            return 0;
        }
        *write(keys) = Arc::new(usable);
        self.refresh.store(false, Ordering::Relaxed);
        n
    }

    /// Whether a token asked for a key the set does not have (cleared by
    /// the next [`Self::set_jwks`]).
    pub fn wants_refresh(&self) -> bool {
        self.refresh.load(Ordering::Relaxed)
    }
}

/// A verified token's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub issuer: Arc<str>,
    pub customer: String,
    /// The plan claim's value, when the issuer names one and it is present.
    pub plan: Option<String>,
}

/// Why a token was refused; the 401's detail says which (never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    TooLarge,
    Malformed,
    UnknownIssuer,
    /// An algorithm the issuer does not allow (`none`, HMAC for a public key…).
    Algorithm,
    /// No key of the issuer verifies it (or its `kid` is unknown).
    Signature,
    Expired,
    NotYetValid,
    Audience,
    /// A required claim (`exp`, `aud`, the customer claim) is absent.
    MissingClaim,
}

impl TokenError {
    pub fn detail(self) -> &'static str {
        match self {
            TokenError::TooLarge => "The token is too large.",
            TokenError::Malformed => "The token is not a well-formed JWT.",
            TokenError::UnknownIssuer => "The token's issuer (iss) is not trusted here.",
            TokenError::Algorithm => "The token's algorithm is not one its issuer uses.",
            TokenError::Signature => "The token's signature does not verify.",
            TokenError::Expired => "The token has expired (exp).",
            TokenError::NotYetValid => "The token is not valid yet (nbf).",
            TokenError::Audience => "The token is not meant for this API (aud).",
            TokenError::MissingClaim => {
                "The token lacks a required claim (exp, aud or the customer claim)."
            }
        }
    }
}

/// A JWK set as an identity provider serves it; keys this crate cannot
/// use (an encryption key, an unknown `kty`) are skipped, not fatal.
pub fn parse_jwks(text: &[u8]) -> Result<JwkSet, String> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or("no `keys` array")?;
    Ok(JwkSet {
        keys: keys
            .iter()
            .filter_map(|k| serde_json::from_value(k.clone()).ok())
            .collect(),
    })
}

/// Whether a bearer value has a JWT's shape (three dot-separated parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// The configured issuers.
pub struct Verifier {
    pub issuers: Vec<Arc<Issuer>>,
}

impl Verifier {
    /// Verifies `token` at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        // The issuer only selects the keys: nothing of the payload is
        // trusted before the signature verifies.
        let iss = unverified_iss(token).ok_or(TokenError::Malformed)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.iss == iss)
            .ok_or(TokenError::UnknownIssuer)?;
        if !issuer.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = issuer.leeway_secs;
        v.validate_nbf = true;
        v.set_issuer(&[&issuer.iss]);
        if issuer.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&issuer.audience);
            v.set_required_spec_claims(&["exp", "aud"]);
        }
        let claims = match &issuer.keys {
            Keys::Secret(k) | Keys::Pem(k) => decode(token, k, &v, now_secs)?,
            Keys::Jwks(set) => {
                let set = Arc::clone(&read(set));
                let candidates: Vec<&DecodingKey> = set
                    .iter()
                    .filter(|(kid, _)| {
                        header.kid.is_none() || kid.as_deref() == header.kid.as_deref()
                    })
                    .map(|(_, k)| k)
                    .collect();
                if candidates.is_empty() {
                    issuer.refresh.store(true, Ordering::Relaxed);
                    return Err(TokenError::Signature);
                }
                let mut last = TokenError::Signature;
                let mut found = None;
                for k in candidates {
                    match decode(token, k, &v, now_secs) {
                        Ok(c) => {
                            found = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                found.ok_or(last)?
            }
        };
        let customer = claims
            .get(&issuer.customer_claim)
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .ok_or(TokenError::MissingClaim)?;
        let plan = issuer
            .plan_claim
            .as_ref()
            .and_then(|p| claims.get(p))
            .and_then(|p| p.as_str())
            .map(str::to_owned);
        Ok(Verified {
            issuer: Arc::clone(&issuer.name),
            customer: customer.to_owned(),
            plan,
        })
    }
}

/// The `iss` of a token's payload, before verification.
fn unverified_iss(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_owned)
}

/// Verifies the signature and claims; `exp`/`nbf` against `now_secs`
/// (the crate reads the system clock, so they are checked here instead).
fn decode(
    token: &str,
    key: &DecodingKey,
    v: &Validation,
    now_secs: u64,
) -> Result<serde_json::Map<String, serde_json::Value>, TokenError> {
    use jsonwebtoken::errors::ErrorKind as K;
    let mut v = v.clone();
    v.validate_exp = false;
    v.validate_nbf = false;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &v)
        .map_err(|e| match e.kind() {
        K::InvalidSignature => TokenError::Signature,
        K::InvalidAlgorithm | K::MissingAlgorithm | K::InvalidAlgorithmName => {
            TokenError::Algorithm
        }
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience => TokenError::Audience,
        K::InvalidIssuer => TokenError::UnknownIssuer,
        K::MissingRequiredClaim(_) => TokenError::MissingClaim,
        _ => TokenError::Malformed,
    })?;
    let claims = data.claims;
    let num = |name: &str| claims.get(name).and_then(serde_json::Value::as_u64);
    let exp = num("exp").ok_or(TokenError::MissingClaim)?;
    if exp.saturating_add(v.leeway) < now_secs {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf.as_u64().ok_or(TokenError::Malformed)?;
        if nbf > now_secs.saturating_add(v.leeway) {
            return Err(TokenError::NotYetValid);
        }
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &[u8] = b"a-secret-of-at-least-thirty-two-bytes";

    fn issuer() -> Issuer {
        Issuer::new(
            "idp".into(),
            "https://idp/".into(),
            vec!["api".into()],
            vec![Algorithm::HS256],
            Keys::Jwks(Default::default()),
            "sub".into(),
            None,
            30,
        )
    }

    fn token(kid: &str, exp: u64) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        let claims =
            serde_json::json!({"iss": "https://idp/", "aud": "api", "sub": "cus_1", "exp": exp});
        encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn set(kid: &str) -> JwkSet {
        use base64::Engine;
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        parse_jwks(
            serde_json::json!({"keys": [{"kty": "oct", "kid": kid, "alg": "HS256", "k": k}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn an_unknown_kid_asks_for_a_refresh_and_the_new_set_verifies() {
        let i = Arc::new(issuer());
        let v = Verifier {
            issuers: vec![Arc::clone(&i)],
        };
        assert_eq!(i.set_jwks(&set("old")), 1);
        let t = token("new", 2_000);
        assert_eq!(v.verify(&t, 1_000), Err(TokenError::Signature));
        assert!(i.wants_refresh());
        // An empty or unusable set keeps the last good one.
        assert_eq!(i.set_jwks(&JwkSet { keys: vec![] }), 0);
        assert!(i.wants_refresh());
        assert_eq!(i.set_jwks(&set("new")), 1);
        assert!(!i.wants_refresh());
        assert_eq!(v.verify(&t, 1_000).unwrap().customer, "cus_1");
        // exp is checked against the gate's clock, with the leeway.
        assert!(v.verify(&t, 2_030).is_ok());
        assert_eq!(v.verify(&t, 2_031), Err(TokenError::Expired));
    }

    #[test]
    fn junk_never_panics() {
        let v = Verifier {
            issuers: vec![Arc::new(issuer())],
        };
        for junk in [
            "",
            ".",
            "..",
            "a.b.c",
            "e30.e30.",
            "eyJhbGciOiJub25lIn0.e30.",
            &"x".repeat(10_000),
        ] {
            assert!(v.verify(junk, 0).is_err(), "{junk}");
        }
    }
}
