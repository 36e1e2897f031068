//! The admin API's reads: usage, customers, keys, limits.

use std::sync::Arc;

use http::Response;

use tollgate_core::limiter::Limiter;
use tollgate_core::store::admin;
use tollgate_core::store::{KeyInfo, UpdateStore};
use tollgate_core::usage::UsageReport;

use super::{problem, respond, AdminApp};

impl AdminApp {
    pub(super) async fn usage(&self, customer: Option<&str>) -> Response<Vec<u8>> {
        let app = &self.app;
        let snap = app.gate.keys.snapshot();
        let ids: Vec<Arc<str>> = match customer {
            Some(c) => vec![c.into()],
            None => {
                // Every customer in the store, and any with usage but no keys left.
                let mut ids: std::collections::BTreeSet<Arc<str>> = snap.customer_ids().collect();
                ids.extend(app.meter.ledger.customers());
                ids.extend(app.spool.iter().flat_map(|s| s.customers()));
                ids.into_iter().collect()
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let (identity, plan) = app.gate.customer(id);
            let decision = match app.gate.limiter.check(&identity.customer, &plan, 0).await {
                Ok(d) => d,
                Err(_) => {
                    return problem(
                        503,
                        "Limits unavailable",
                        "the limiter store cannot be reached",
                    )
                }
            };
            let period = app.meter.ledger.usage(&identity.customer);
            let billing = app.meter.totals(&identity.customer);
            let mut report =
                UsageReport::new(&identity.customer, &plan, &decision, &period, billing);
            report.subscription = identity.billing.map(|b| b.as_str());
            report.credits = app.gate.balance(&identity, &plan);
            if let Ok(v) = serde_json::to_value(&report) {
                out.push(v);
            }
        }
        respond(
            200,
            "application/json",
            serde_json::Value::from(out).to_string().into_bytes(),
        )
    }

    /// A customer's own limits (null: its plan's) and the limits in force.
    pub(super) fn limits(&self, id: &str) -> Response<Vec<u8>> {
        let data = match self.app.keys.data() {
            Ok(d) => d,
            Err(e) => return problem(e.status(), "Cannot read the key store", &e.to_string()),
        };
        let Some(own) = data.customers.get(id).and_then(|c| c.limits.as_ref()) else {
            return problem(
                404,
                "Not found",
                &format!("customer {id} has no limits of its own: its plan's apply"),
            );
        };
        let (_, plan) = self.app.gate.customer(id.into());
        let effective: Vec<serde_json::Value> = plan
            .limits
            .iter()
            .map(|l| serde_json::json!({"name": &*l.name, "requests": l.quota, "per": l.window.name()}))
            .collect();
        let body = serde_json::json!({
            "customer": id,
            "plan": &*plan.name,
            "limits": own,
            "effective": effective,
        });
        respond(200, "application/json", body.to_string().into_bytes())
    }

    /// Keys (of one customer, or one key): never the key or its hash.
    pub(super) fn keys(&self, customer: Option<&str>, id: Option<&str>) -> Response<Vec<u8>> {
        let now = self.app.gate.clock.now_ms();
        let data = match self.app.keys.data() {
            Ok(d) => d,
            Err(e) => {
                log::error!("admin: cannot read the key store: {e}");
                return problem(e.status(), "Key store unreadable", "see the Tollgate log");
            }
        };
        let list: Vec<serde_json::Value> = data
            .keys
            .iter()
            .filter(|k| customer.is_none_or(|c| c == k.customer))
            .filter(|k| id.is_none_or(|i| i == k.id))
            .map(|k| {
                serde_json::json!({
                    "id": k.id,
                    "start": k.start,
                    "customer": k.customer,
                    "name": k.name,
                    "meta": k.meta,
                    "created": k.created,
                    "expires": k.expires,
                    "revoked": k.revoked,
                    "status": admin::status(k, now),
                })
            })
            .collect();
        match (id, list.into_iter()) {
            (Some(id), mut one) => match one.next() {
                Some(k) => respond(200, "application/json", k.to_string().into_bytes()),
                None => problem(404, "Not found", &format!("key {id} not found")),
            },
            (None, all) => respond(
                200,
                "application/json",
                serde_json::Value::from(all.collect::<Vec<_>>())
                    .to_string()
                    .into_bytes(),
            ),
        }
    }

    /// Customers (or one): plan, suspension, subscription, own limits, key
    /// counts and usage this period per meter.
    pub(super) async fn customers(&self, id: Option<&str>) -> Response<Vec<u8>> {
        let app = &self.app;
        let data = match app.keys.data() {
            Ok(d) => d,
            Err(e) => return problem(e.status(), "Key store unreadable", &e.to_string()),
        };
        let now = app.gate.clock.now_ms();
        let snap = app.gate.keys.snapshot();
        let mut out = Vec::new();
        for (cid, c) in &data.customers {
            if id.is_some_and(|i| i != cid) {
                continue;
            }
            let view = snap.customer(cid).unwrap_or_default();
            let plan = app.gate.plan_of(&Arc::new(KeyInfo::new(
                "".into(),
                cid.as_str().into(),
                view,
            )));
            let (mut active, mut total) = (0u64, 0u64);
            for k in data.keys.iter().filter(|k| &k.customer == cid) {
                total += 1;
                if matches!(admin::status(k, now), "active" | "expiring") {
                    active += 1;
                }
            }
            let period = app.meter.ledger.usage(cid);
            let mut usage = std::collections::BTreeMap::<&str, u64>::new();
            for (m, n) in &period.meters {
                *usage.entry(&**m).or_default() += n;
            }
            out.push(serde_json::json!({
                "id": cid,
                "plan": &*plan.name,
                "suspended": c.is_suspended(),
                "subscription": c.billing.as_ref().map(|b| b.status.as_str()),
                "limits": c.limits,
                "keys": {"active": active, "total": total},
                "usage": usage,
            }));
        }
        match id {
            Some(i) => match out.pop() {
                Some(c) => respond(200, "application/json", c.to_string().into_bytes()),
                None => problem(404, "Not found", &format!("customer {i} not found")),
            },
            None => respond(
                200,
                "application/json",
                serde_json::Value::from(out).to_string().into_bytes(),
            ),
        }
    }
}
