//! `GET /admin/billing` (each sink's pending units, lag and dead letters)
//! and `POST /admin/billing/replay` (dead letters back in a sink's queue):
//! what `tollgate billing status | replay` show and do, for the spool this
//! process holds.

use http::Response;

use tollgate_core::clock::{rfc3339, Millis};
use tollgate_metering::spool::Inspection;

use super::write::{only_fields, text};
use super::{problem, respond, AdminApp};

/// The status document, shared with `tollgate billing status --json`.
pub fn status_json(s: &Inspection, now: Millis) -> serde_json::Value {
    let sinks: Vec<serde_json::Value> = s
        .sinks
        .iter()
        .map(|k| {
            serde_json::json!({
                "sink": k.sink,
                "pending_units": k.pending_units,
                "oldest_window": k.oldest.map(rfc3339),
                "lag_seconds": k.oldest.map_or(0, |o| now.saturating_sub(o) / 1000),
                "dead_letters": k.dead_letters,
            })
        })
        .collect();
    serde_json::json!({ "spool_bytes": s.bytes, "sinks": sinks })
}

impl AdminApp {
    pub(super) fn billing_status(&self) -> Response<Vec<u8>> {
        let Some(spool) = &self.app.spool else {
            return metering_off();
        };
        let body = status_json(&spool.status(), self.app.gate.clock.now_ms());
        respond(200, "application/json", body.to_string().into_bytes())
    }

    /// `{"sink": S, "ids": [...]}` (no `ids`: every dead letter of S).
    pub(super) async fn replay(&self, body: serde_json::Value) -> Response<Vec<u8>> {
        let Some(spool) = self.app.spool.clone() else {
            return metering_off();
        };
        let parsed = only_fields(&body, &["sink", "ids"]).and_then(|()| {
            let sink = text(&body, "sink")?.ok_or((400, "`sink` is required".to_owned()))?;
            let ids = match body.get("ids") {
                None => None,
                Some(serde_json::Value::Array(a)) => Some(
                    a.iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<Vec<String>>>()
                        .ok_or((400, "`ids` must be an array of strings".to_owned()))?,
                ),
                Some(_) => return Err((400, "`ids` must be an array of strings".to_owned())),
            };
            Ok((sink, ids))
        });
        let (sink, ids) = match parsed {
            Ok(p) => p,
            Err((status, msg)) => return problem(status, "Bad request", &msg),
        };
        let alerts = sink == tollgate_metering::alerts::ALERTS && !spool.config().alerts.is_empty();
        if !spool.config().sinks.contains(&sink) && !alerts {
            return problem(
                404,
                "Not found",
                &format!(
                    "no sink `{sink}` (configured: {})",
                    spool.config().sinks.join(", ")
                ),
            );
        }
        let name = sink.clone();
        let wanted = ids.clone();
        // File I/O off the workers.
        let result =
            tokio::task::spawn_blocking(move || spool.replay(&name, wanted.as_deref())).await;
        match result {
            Ok(Ok(replayed)) => {
                let not_found: Vec<String> = ids
                    .into_iter()
                    .flatten()
                    .filter(|i| !replayed.contains(i))
                    .collect();
                let body = serde_json::json!({
                    "sink": sink,
                    "replayed": replayed,
                    "not_found": not_found,
                });
                respond(200, "application/json", body.to_string().into_bytes())
            }
            Ok(Err(e)) => {
                log::error!("replay of {sink}'s dead letters failed: {e}");
                problem(
                    500,
                    "Replay failed",
                    "nothing was replayed; see the Tollgate log",
                )
            }
            Err(_) => problem(500, "Internal error", "see the Tollgate log"),
        }
    }
}

fn metering_off() -> Response<Vec<u8>> {
    problem(
        409,
        "Metering is off",
        "metering.enabled is false: there is no usage spool",
    )
}
