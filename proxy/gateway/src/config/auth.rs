//! `auth.jwt`: the identity providers whose JWTs stand in for API keys.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tollgate_core::diag::Check;
use tollgate_core::jwt::{self, Issuer, Keys, Verifier};

/// The validated section: the verifier the gate uses, and the key sets the
/// gateway fetches in the background.
#[derive(Clone)]
pub struct Auth {
    pub verifier: Arc<Verifier>,
    pub fetch: Vec<JwksFetch>,
}

/// A `jwks_url` issuer's key set, fetched every `refresh` (and, when a
/// token names an unknown `kid`, at most once a minute).
#[derive(Clone)]
pub struct JwksFetch {
    pub issuer: Arc<Issuer>,
    pub url: String,
    pub refresh: Duration,
}

impl std::fmt::Debug for Auth {
    // Secrets and keys stay out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.verifier.issuers.iter().map(|i| &*i.name).collect();
        write!(f, "Auth({names:?})")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    jwt: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    issuer: String,
    name: Option<String>,
    audience: Option<OneOrMany>,
    hs256_secret_env: Option<String>,
    hs384_secret_env: Option<String>,
    hs512_secret_env: Option<String>,
    public_key_file: Option<String>,
    jwks_file: Option<String>,
    jwks_url: Option<String>,
    algorithms: Option<Vec<String>>,
    customer_claim: Option<String>,
    plan_claim: Option<String>,
    leeway: Option<String>,
    jwks_refresh: Option<String>,
}

const ASYMMETRIC: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
];

pub(super) fn parse(cx: &mut Check<'_>, raw: &RawAuth) -> Option<Auth> {
    if raw.jwt.is_empty() {
        return None;
    }
    let mut issuers = Vec::new();
    let mut fetch = Vec::new();
    for (i, item) in raw.jwt.iter().enumerate() {
        let p = format!("auth.jwt[{i}]");
        let Some(r) = cx.typed::<RawIssuer>(&p, item) else {
            continue;
        };
        if let Some((issuer, url, refresh)) = issuer(cx, &p, r) {
            if issuers
                .iter()
                .any(|o: &Arc<Issuer>| o.iss == issuer.iss || o.name == issuer.name)
            {
                cx.err(&p, format!("issuer `{}` is listed twice", issuer.iss), None);
                continue;
            }
            let issuer = Arc::new(issuer);
            if let Some(url) = url {
                fetch.push(JwksFetch {
                    issuer: Arc::clone(&issuer),
                    url,
                    refresh,
                });
            }
            issuers.push(issuer);
        }
    }
    Some(Auth {
        verifier: Arc::new(Verifier { issuers }),
        fetch,
    })
}

/// One issuer; its `jwks_url` and refresh when it has one.
fn issuer(cx: &mut Check<'_>, p: &str, r: RawIssuer) -> Option<(Issuer, Option<String>, Duration)> {
    let hmac = [
        (&r.hs256_secret_env, Algorithm::HS256, "hs256_secret_env"),
        (&r.hs384_secret_env, Algorithm::HS384, "hs384_secret_env"),
        (&r.hs512_secret_env, Algorithm::HS512, "hs512_secret_env"),
    ];
    let hmac: Vec<_> = hmac.into_iter().filter(|(v, ..)| v.is_some()).collect();
    let sources = hmac.len()
        + [&r.public_key_file, &r.jwks_file, &r.jwks_url]
            .iter()
            .filter(|s| s.is_some())
            .count();
    if sources != 1 {
        cx.err(
            p,
            "an issuer needs exactly one key source",
            Some("one of hs256_secret_env (or hs384/hs512), public_key_file, jwks_file, jwks_url"),
        );
        return None;
    }
    let leeway = cx.duration(
        &format!("{p}.leeway"),
        r.leeway.as_deref(),
        Duration::from_secs(30),
    );
    let refresh = cx.duration(
        &format!("{p}.jwks_refresh"),
        r.jwks_refresh.as_deref(),
        Duration::from_secs(600),
    );
    let mut url = None;
    let (algorithms, keys) = if let Some((Some(var), alg, field)) = hmac.first().cloned() {
        if r.algorithms.is_some() {
            cx.err(
                &format!("{p}.algorithms"),
                format!("`{field}` fixes the algorithm"),
                None,
            );
        }
        let secret = cx.secret(&format!("{p}.{field}"), var)?;
        if !secret.is_empty() && secret.len() < 32 {
            cx.err(
                &format!("{p}.{field}"),
                format!("{var} must hold at least 32 bytes (RFC 7518: a key as long as the hash)"),
                Some("e.g. openssl rand -base64 48"),
            );
        }
        (
            vec![alg],
            Keys::Secret(DecodingKey::from_secret(secret.as_bytes())),
        )
    } else {
        let names = r.algorithms.clone().unwrap_or_else(|| vec!["RS256".into()]);
        let mut algorithms = Vec::new();
        for a in &names {
            if !ASYMMETRIC.contains(&a.as_str()) {
                cx.err(
                    &format!("{p}.algorithms"),
                    format!("`{a}` is not a public-key algorithm"),
                    Some("RS256, RS384, RS512, PS256, ES256, ES384 or EdDSA (HMAC takes hs256_secret_env)"),
                );
            } else if let Ok(alg) = a.parse::<Algorithm>() {
                algorithms.push(alg);
            }
        }
        let keys = if let Some(file) = &r.public_key_file {
            let path = cx.path(file);
            let pem = match std::fs::read(&path) {
                Ok(p) => p,
                Err(e) => {
                    cx.err(
                        &format!("{p}.public_key_file"),
                        format!("cannot read {}: {e}", path.display()),
                        None,
                    );
                    return None;
                }
            };
            let key = match algorithms.first() {
                Some(Algorithm::ES256 | Algorithm::ES384) => DecodingKey::from_ec_pem(&pem),
                Some(Algorithm::EdDSA) => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            };
            match key {
                Ok(k) => Keys::Pem(k),
                Err(e) => {
                    cx.err(
                        &format!("{p}.public_key_file"),
                        format!("not a PEM public key for {}: {e}", names.join("/")),
                        Some("an RSA key needs RS*/PS*, an EC key ES256/ES384, an Ed25519 key EdDSA (set `algorithms`)"),
                    );
                    return None;
                }
            }
        } else {
            let keys = Keys::Jwks(Default::default());
            if let Some(u) = &r.jwks_url {
                cx.http_url(&format!("{p}.jwks_url"), u);
                url = Some(u.clone());
            }
            keys
        };
        (algorithms, keys)
    };
    let name = r.name.clone().unwrap_or_else(|| default_name(&r.issuer));
    if !name.bytes().all(|b| b.is_ascii_graphic()) || name.is_empty() {
        cx.err(
            &format!("{p}.name"),
            "`name` must be visible ASCII (it goes into X-Tollgate-Key-Id)",
            None,
        );
    }
    let audience = match r.audience {
        None => Vec::new(),
        Some(OneOrMany::One(a)) => vec![a],
        Some(OneOrMany::Many(a)) => a,
    };
    let issuer = Issuer::new(
        name.into(),
        r.issuer,
        audience,
        algorithms,
        keys,
        r.customer_claim.unwrap_or_else(|| "sub".into()),
        r.plan_claim,
        leeway.as_secs(),
    );
    if let Some(file) = &r.jwks_file {
        let path = cx.path(file);
        let usable = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| jwt::parse_jwks(&b))
            .map(|set| issuer.set_jwks(&set));
        match usable {
            Ok(0) => cx.err(
                &format!("{p}.jwks_file"),
                format!("{} holds no usable key", path.display()),
                None,
            ),
            Ok(_) => {}
            Err(e) => cx.err(
                &format!("{p}.jwks_file"),
                format!("{}: {e}", path.display()),
                None,
            ),
        }
    }
    Some((issuer, url, refresh))
}

/// `https://auth.example.com/` → `auth.example.com`.
fn default_name(iss: &str) -> String {
    let s = iss.split("://").nth(1).unwrap_or(iss);
    let host = s.split('/').next().unwrap_or(s);
    if host.is_empty() {
        iss.to_owned()
    } else {
        host.to_owned()
    }
}
