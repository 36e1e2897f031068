//! The upstream's OpenAPI document with what Tollgate adds in front of it:
//! the key's security schemes, the rate-limit response headers, and the
//! problem+json answers Tollgate itself gives (401, 403, 429) on every
//! operation a key is needed for. Paths, schemas and the upstream's own
//! answers are left as they are; 3.0 and 3.1 documents stay what they were.

use serde_json::{json, Map, Value};
use tollgate_core::plans::Plans;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Whether plans.yaml makes this operation public (no key, no limits).
pub fn is_public(plans: &Plans, method: &str, template: &str) -> bool {
    // A concrete path for the template: each `{param}` as one segment.
    let path: String = template
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                "x"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    let Ok(m) = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        return false;
    };
    plans.route(&m, &path).is_some_and(|r| r.public)
}

fn header(description: &str) -> Value {
    json!({"description": description, "schema": {"type": "string"}})
}

pub fn augment(upstream: &Value, plans: &Plans) -> Result<Value, String> {
    let mut doc = upstream.clone();
    let version = doc
        .get("openapi")
        .and_then(Value::as_str)
        .ok_or("the upstream document has no `openapi` version (Swagger 2.0 is not supported)")?
        .to_owned();
    if !(version.starts_with("3.0") || version.starts_with("3.1")) {
        return Err(format!("OpenAPI {version} is not supported (3.0 or 3.1)"));
    }
    let root = doc
        .as_object_mut()
        .ok_or("the upstream document is not an object")?;
    let components = root
        .entry("components")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("`components` is not an object")?;
    let schemes = components
        .entry("securitySchemes")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("`components.securitySchemes` is not an object")?;
    schemes.insert(
        "tollgateApiKey".into(),
        json!({"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "Your API key"}),
    );
    schemes.insert(
        "tollgateBearer".into(),
        json!({"type": "http", "scheme": "bearer", "description": "Your API key (or a JWT, where configured) as a bearer token"}),
    );
    let schemas = components
        .entry("schemas")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("`components.schemas` is not an object")?;
    schemas.insert(
        "TollgateProblem".into(),
        json!({
            "type": "object",
            "description": "RFC 9457 problem details",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"},
                "violated-policies": {"type": "array", "items": {"type": "string"}},
                "retry-after": {"type": "integer"}
            }
        }),
    );
    let headers = components
        .entry("headers")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("`components.headers` is not an object")?;
    for (name, desc) in [
        (
            "RateLimit",
            "What is left of each limit (`r`) and seconds until it comes back (`t`)",
        ),
        (
            "RateLimit-Policy",
            "The plan's limits: `q` requests per `w` seconds",
        ),
        ("X-RateLimit-Limit", "The limit closest to exhaustion"),
        ("X-RateLimit-Remaining", "What is left of it"),
        ("X-RateLimit-Reset", "Seconds until it resets"),
        ("Retry-After", "Seconds to wait before retrying"),
    ] {
        headers.insert(name.into(), header(desc));
    }
    let problem = |desc: &str, extra: &[&str]| {
        let mut h = Map::new();
        for name in extra {
            h.insert(
                (*name).into(),
                json!({"$ref": format!("#/components/headers/{name}")}),
            );
        }
        json!({
            "description": desc,
            "headers": h,
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/TollgateProblem"}}}
        })
    };
    let responses = components
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or("`components.responses` is not an object")?;
    responses.insert(
        "TollgateUnauthorized".into(),
        problem("Missing, malformed, unknown, revoked or expired key", &[]),
    );
    responses.insert(
        "TollgateForbidden".into(),
        problem("The account is suspended", &[]),
    );
    responses.insert(
        "TollgateRateLimited".into(),
        problem(
            "A limit of the plan is exhausted",
            &[
                "Retry-After",
                "RateLimit",
                "RateLimit-Policy",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
        ),
    );
    let rate_headers = [
        "RateLimit",
        "RateLimit-Policy",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    ];
    let paths = root
        .get_mut("paths")
        .and_then(Value::as_object_mut)
        .ok_or("the upstream document has no `paths`")?;
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for method in METHODS {
            let Some(op) = item.get_mut(*method).and_then(Value::as_object_mut) else {
                continue;
            };
            if is_public(plans, method, path) {
                op.insert("security".into(), json!([]));
                continue;
            }
            op.insert(
                "security".into(),
                json!([{"tollgateBearer": []}, {"tollgateApiKey": []}]),
            );
            let resp = op
                .entry("responses")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or_else(|| format!("{method} {path}: `responses` is not an object"))?;
            for (code, r) in resp.iter_mut() {
                // Tollgate stamps the headers on the upstream's answers;
                // a `$ref` response is left as it is.
                if !code.starts_with('2') || r.get("$ref").is_some() {
                    continue;
                }
                if let Some(r) = r.as_object_mut() {
                    let h = r
                        .entry("headers")
                        .or_insert_with(|| json!({}))
                        .as_object_mut()
                        .ok_or_else(|| {
                            format!("{method} {path} {code}: `headers` is not an object")
                        })?;
                    for name in rate_headers {
                        h.entry(name).or_insert_with(
                            || json!({"$ref": format!("#/components/headers/{name}")}),
                        );
                    }
                }
            }
            for (code, name) in [
                ("401", "TollgateUnauthorized"),
                ("403", "TollgateForbidden"),
                ("429", "TollgateRateLimited"),
            ] {
                resp.entry(code)
                    .or_insert_with(|| json!({"$ref": format!("#/components/responses/{name}")}));
            }
        }
    }
    if !root.contains_key("security") {
        root.insert(
            "security".into(),
            json!([{"tollgateBearer": []}, {"tollgateApiKey": []}]),
        );
    }
    Ok(doc)
}
