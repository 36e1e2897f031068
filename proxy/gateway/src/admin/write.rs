//! The admin API's changes to the key store, applied as the CLI applies them.

use http::Response;
use pingora::protocols::http::ServerSession;

use tollgate_core::clock::{parse_duration, Millis};
use tollgate_core::plans::custom::parse_limit_specs;
use tollgate_core::store::admin::{self, CreateKey};
use tollgate_core::store::StoreError;

use super::{problem, respond, AdminApp};
use crate::app::Keys;
use crate::config::Config;

/// An admin API change to the key store.
pub(super) enum Write {
    Create(serde_json::Value),
    Revoke(String),
    Rotate(String, serde_json::Value),
    SetPlan(String, serde_json::Value),
    /// `None`: back to the plan's limits.
    SetLimits(String, Option<serde_json::Value>),
    Suspend(String, bool),
}

/// At most this much request body is read.
const MAX_BODY: usize = 64 * 1024;

pub(super) async fn read_body(
    session: &mut ServerSession,
) -> Result<serde_json::Value, Box<Response<Vec<u8>>>> {
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                buf.extend_from_slice(&chunk);
                if buf.len() > MAX_BODY {
                    return Err(Box::new(problem(
                        413,
                        "Body too large",
                        "admin requests are small JSON objects",
                    )));
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Box::new(problem(
                    400,
                    "Bad request",
                    "the request body could not be read",
                )))
            }
        }
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_slice::<serde_json::Value>(&buf) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ => Err(Box::new(problem(
            400,
            "Bad request",
            "the body must be a JSON object",
        ))),
    }
}

/// A body with a field the operation does not take is refused, naming it:
/// a typo (`plna`) must not be ignored.
pub(super) fn only_fields(body: &serde_json::Value, allowed: &[&str]) -> Result<(), (u16, String)> {
    let unknown = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())));
    match unknown {
        Some(k) => Err((
            400,
            format!(
                "unknown field `{k}`; this request takes {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// A string field: absent is None; present with another type is a 400.
pub(super) fn text(body: &serde_json::Value, name: &str) -> Result<Option<String>, (u16, String)> {
    match body.get(name) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err((400, format!("`{name}` must be a string"))),
    }
}

impl AdminApp {
    pub(super) async fn write(&self, op: Write) -> Response<Vec<u8>> {
        let store = self.app.keys.clone();
        let config = self.app.live();
        let now = self.app.gate.clock.now_ms();
        // Store I/O (a file, or Redis through a blocking adapter) off the workers.
        let result = tokio::task::spawn_blocking(move || apply(op, &store, &config, now)).await;
        match result {
            Ok(Ok((status, body))) => {
                // This instance applies its own change now; others follow
                // within a second.
                if let Err(e) = self.reload_keys().await {
                    log::warn!("admin: changed the key store but could not re-read it yet: {e}");
                }
                respond(status, "application/json", body.to_string().into_bytes())
            }
            Ok(Err((status, msg))) => problem(
                status,
                if status == 404 {
                    "Not found"
                } else {
                    "Cannot change the key store"
                },
                &msg,
            ),
            Err(_) => problem(500, "Internal error", "see the Tollgate log"),
        }
    }

    async fn reload_keys(&self) -> Result<(), StoreError> {
        self.app.keys.reload().await
    }

    /// Re-reads the key store and the config and plans files. A config
    /// with errors (or a change that takes a restart) is a 409 naming them;
    /// the previous config stays in force.
    pub(super) async fn reload(&self) -> Response<Vec<u8>> {
        if let Err(e) = self.reload_keys().await {
            self.app.note_reload(Err(e.to_string()));
            tollgate_core::metrics::CONFIG_RELOADS
                .with_label_values(&["error"])
                .inc();
            log::error!("admin reload failed: {e}");
            return problem(
                500,
                "Reload failed",
                "the previous keys stay in force; see the Tollgate log",
            );
        }
        let app = self.app.clone();
        // File reads off the workers.
        match tokio::task::spawn_blocking(move || app.reload_config()).await {
            Ok(Ok(version)) => respond(
                200,
                "application/json",
                serde_json::json!({"reloaded": ["keys", "config"], "config_version": version})
                    .to_string()
                    .into_bytes(),
            ),
            Ok(Err(e)) => problem(409, "Config not reloaded", &e),
            Err(_) => problem(500, "Reload failed", "see the Tollgate log"),
        }
    }
}

/// An admin API change, applied to the store as the CLI applies it: the
/// status and body to answer with, or the status and reason of a refusal.
fn apply(
    op: Write,
    store: &Keys,
    config: &Config,
    now: Millis,
) -> Result<(u16, serde_json::Value), (u16, String)> {
    let bad = |m: String| (400u16, m);
    let known = |plan: &str| -> Result<(), (u16, String)> {
        config
            .plans
            .get(plan)
            .map(|_| ())
            .ok_or_else(|| bad(format!("unknown plan `{plan}`")))
    };
    let store_err = |e: StoreError| (e.status(), e.to_string());
    // One spelling per duration, as the API's schema says: 1-6 digits
    // without a leading zero, then s, m, h or d.
    let duration = |v: Option<String>, what: &str| -> Result<Option<u64>, (u16, String)> {
        let Some(s) = v else { return Ok(None) };
        let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
        let canonical = s.len() == digits.len() + 1
            && (1..=6).contains(&digits.len())
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit());
        canonical
            .then(|| parse_duration(&s))
            .flatten()
            .map(|d| Some(d.as_millis() as u64))
            .ok_or_else(|| bad(format!("`{what}` must be a duration like 90d or 24h")))
    };
    match op {
        Write::Create(body) => {
            only_fields(
                &body,
                &["customer", "plan", "name", "expires", "set_plan", "meta"],
            )?;
            let customer =
                text(&body, "customer")?.ok_or_else(|| bad("`customer` is required".into()))?;
            let plan = text(&body, "plan")?;
            if let Some(p) = &plan {
                known(p)?;
            }
            let expires =
                duration(text(&body, "expires")?, "expires")?.map(|ms| now.saturating_add(ms));
            let name = text(&body, "name")?;
            let set_plan = match body.get("set_plan") {
                None => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad("`set_plan` must be true or false".into()))?,
            };
            let meta = match body.get("meta") {
                None => None,
                Some(serde_json::Value::Object(m)) => Some(m.clone()),
                Some(_) => return Err(bad("`meta` must be a JSON object".into())),
            };
            let new = admin::create_key(
                store,
                &config.key_prefix,
                CreateKey {
                    customer: &customer,
                    plan: plan.as_deref(),
                    name: name.as_deref(),
                    expires,
                    set_plan,
                    meta,
                },
                now,
            )
            .map_err(store_err)?;
            Ok((
                201,
                serde_json::json!({ "key": new.raw, "id": new.record.id, "customer": customer, "expires": new.record.expires }),
            ))
        }
        Write::Revoke(id) => {
            let k = admin::revoke(store, &id, now).map_err(store_err)?;
            Ok((200, serde_json::json!({ "id": k.id, "status": "revoked" })))
        }
        Write::Rotate(id, body) => {
            only_fields(&body, &["grace"])?;
            let grace = duration(text(&body, "grace")?, "grace")?.unwrap_or(86_400_000);
            let new =
                admin::rotate(store, &config.key_prefix, &id, grace, now).map_err(store_err)?;
            Ok((
                201,
                serde_json::json!({ "key": new.raw, "id": new.record.id, "replaces": id }),
            ))
        }
        Write::SetPlan(id, body) => {
            only_fields(&body, &["plan"])?;
            let plan = text(&body, "plan")?.ok_or_else(|| bad("`plan` is required".into()))?;
            known(&plan)?;
            admin::set_plan(store, &id, &plan).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "plan": plan })))
        }
        Write::SetLimits(id, Some(body)) => {
            only_fields(&body, &["limits"])?;
            let list = body.get("limits").ok_or_else(|| {
                bad("`limits` is required: a list of limits like a plan's".into())
            })?;
            let specs = parse_limit_specs(list, "limits").map_err(|errs| {
                let all: Vec<String> = errs
                    .fields
                    .iter()
                    .map(|(p, m)| format!("{p}: {m}"))
                    .collect();
                (if errs.semantic { 422 } else { 400 }, all.join("; "))
            })?;
            admin::set_limits(store, &id, Some(specs.clone())).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "limits": specs })))
        }
        Write::SetLimits(id, None) => {
            admin::set_limits(store, &id, None).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "limits": null })))
        }
        Write::Suspend(id, suspended) => {
            admin::set_suspended(store, &id, suspended).map_err(store_err)?;
            Ok((
                200,
                serde_json::json!({ "customer": id, "suspended": suspended }),
            ))
        }
    }
}
