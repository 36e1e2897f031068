//! `GET /admin/customers/{id}/credits` (the balance and this period's
//! history) and `POST /admin/customers/{id}/credits` (`{"amount": N,
//! "idempotency_key": "…", "reason": "…"}`: a grant, or, negative, a
//! removal). A grant is journaled in the usage spool (with Redis limits,
//! made in Redis) before it is answered;
//! a retry with the same idempotency key changes nothing and answers 200,
//! the same key with another amount 409 (as Stripe's idempotency keys do).

use std::sync::Arc;

use http::Response;
use tollgate_core::credits::{Balance, CreditPolicy, Grant, Granted, Source};

use super::{problem, respond, AdminApp};
use crate::app::App;

/// The longest idempotency key and reason a grant takes.
const MAX_KEY: usize = 255;
const MAX_REASON: usize = 500;

/// The credit policy of `customer`'s plan (the default one, without a
/// grant, when the plan has no credits: a grant then waits for a plan
/// that spends them).
fn policy_of(app: &App, customer: &Arc<str>) -> (Arc<tollgate_core::plans::Plan>, CreditPolicy) {
    let (_, plan) = app.gate.customer(customer.clone());
    let policy = plan.credits.as_deref().cloned().unwrap_or_default();
    (plan, policy)
}

/// Grants credits to `customer`, durably (off the async workers).
pub async fn grant(
    app: &App,
    customer: Arc<str>,
    grant: Grant,
) -> Result<(Granted, Balance), String> {
    let Some(book) = app.gate.credits.clone() else {
        return Err("metering is off: credits have nowhere to be kept".into());
    };
    let (_, policy) = policy_of(app, &customer);
    tokio::task::spawn_blocking(move || {
        book.grant(&customer, &policy, grant)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

impl AdminApp {
    /// The 404 for a customer the key store does not know.
    fn unknown_customer(&self, id: &str) -> Option<Response<Vec<u8>>> {
        let known = self.app.gate.keys.snapshot().customer(id).is_some();
        (!known).then(|| {
            problem(
                404,
                "Not found",
                &format!("no customer `{}`", id.chars().take(64).collect::<String>()),
            )
        })
    }

    pub(super) fn credits(&self, id: &str) -> Response<Vec<u8>> {
        let app = &self.app;
        let Some(book) = &app.gate.credits else {
            return problem(404, "Not found", "metering is off: there are no credits");
        };
        if let Some(unknown) = self.unknown_customer(id) {
            return unknown;
        }
        let customer: Arc<str> = id.into();
        let (plan, policy) = policy_of(app, &customer);
        let now = app.gate.clock.now_ms();
        let body = serde_json::json!({
            "customer": id,
            "plan": &*plan.name,
            "plan_has_credits": plan.credits.is_some(),
            "credits": book.balance(id, &policy, now),
            "history": book.history(id, &policy, now),
        });
        respond(200, "application/json", body.to_string().into_bytes())
    }

    pub(super) async fn grant_credits(
        &self,
        id: &str,
        body: &serde_json::Value,
    ) -> Response<Vec<u8>> {
        let Some(fields) = body.as_object() else {
            return problem(400, "Bad request", "the body must be a JSON object");
        };
        // A typo must not grant credits to nobody.
        if let Some(unknown) = self.unknown_customer(id) {
            return unknown;
        }
        if let Some(k) = fields
            .keys()
            .find(|k| !matches!(k.as_str(), "amount" | "idempotency_key" | "reason"))
        {
            return problem(
                400,
                "Bad request",
                &format!(
                    "unknown field `{}`: a grant takes amount, idempotency_key and reason",
                    k.chars().take(64).collect::<String>()
                ),
            );
        }
        // A whole number, as JSON Schema's `integer` has it (`5.0` is one).
        let whole = body.get("amount").and_then(|v| {
            v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() <= 1e15)
                    .map(|f| f as i64)
            })
        });
        let amount = match whole {
            Some(n) if n != 0 && n.unsigned_abs() <= tollgate_core::lifecycle::events::MAX_PACK => {
                n
            }
            _ => {
                return problem(
                    400,
                    "Bad request",
                    "`amount` must be a whole number of credits other than 0 (negative removes)",
                )
            }
        };
        let text = |k: &str, max: usize| -> Result<Option<String>, String> {
            match body.get(k) {
                None => Ok(None),
                Some(serde_json::Value::String(s))
                    if !s.is_empty()
                        && s.chars().count() <= max
                        && !s.chars().any(char::is_control) =>
                {
                    Ok(Some(s.clone()))
                }
                Some(_) => Err(format!(
                    "`{k}` must be a string of 1 to {max} characters without control characters"
                )),
            }
        };
        let (key, reason) = match (text("idempotency_key", MAX_KEY), text("reason", MAX_REASON)) {
            (Ok(k), Ok(r)) => (k, r),
            (Err(e), _) | (_, Err(e)) => return problem(400, "Bad request", &e),
        };
        let g = Grant {
            at: self.app.gate.clock.now_ms(),
            amount,
            idempotency_key: key,
            reason: reason.unwrap_or_else(|| "admin grant".into()),
            source: Source::Admin,
        };
        match grant(&self.app, id.into(), g).await {
            Ok((Granted::Conflict, _)) => problem(
                409,
                "Idempotency key reused",
                "this idempotency key was used for a grant of another amount",
            ),
            Ok((granted, balance)) => {
                let status = if granted == Granted::Applied {
                    201
                } else {
                    200
                };
                let body = serde_json::json!({
                    "customer": id,
                    "granted": granted == Granted::Applied,
                    "credits": balance,
                });
                respond(status, "application/json", body.to_string().into_bytes())
            }
            Err(e) => problem(503, "Grant not recorded", &e),
        }
    }
}
