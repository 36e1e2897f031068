//! `tollgate keys …`: create, list, revoke and rotate.

use std::process::ExitCode;

use tollgate::config::Config;
use tollgate_core::store::admin::{self, CreateKey};
use tollgate_core::store::UpdateStore;

use super::{duration_ms, known_plan, KeysCmd};

pub(super) fn keys(
    cmd: KeysCmd,
    config: &Config,
    store: &impl UpdateStore,
    now: u64,
) -> Result<ExitCode, String> {
    match cmd {
        KeysCmd::Create {
            customer,
            plan,
            name,
            expires,
            set_plan,
        } => {
            if let Some(p) = &plan {
                known_plan(config, p)?;
            }
            let expires = expires
                .map(|e| duration_ms(&e, "expires"))
                .transpose()?
                .map(|ms| now + ms);
            let new = admin::create_key(
                store,
                &config.key_prefix,
                CreateKey {
                    customer: &customer,
                    plan: plan.as_deref(),
                    name: name.as_deref(),
                    expires,
                    set_plan,
                    meta: None,
                },
                now,
            )
            .map_err(|e| e.to_string())?;
            eprintln!(
                "created {} for customer {customer}; the key is shown once:",
                new.record.id
            );
            println!("{}", new.raw);
        }
        KeysCmd::List { customer, json } => list(config, store, customer.as_deref(), json, now)?,
        KeysCmd::Revoke { id } => {
            let k = admin::revoke(store, &id, now).map_err(|e| e.to_string())?;
            eprintln!("revoked {} (customer {})", k.id, k.customer);
        }
        KeysCmd::Rotate { id, grace } => {
            let grace = duration_ms(&grace, "grace")?;
            let new = admin::rotate(store, &config.key_prefix, &id, grace, now)
                .map_err(|e| e.to_string())?;
            eprintln!(
                "rotated {id}: it expires in {}s; new key {} is shown once:",
                grace / 1000,
                new.record.id
            );
            println!("{}", new.raw);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keys list`: every key (or one customer's), never the key itself. A
/// valid key of a suspended customer shows `suspended`.
fn list(
    config: &Config,
    store: &impl UpdateStore,
    customer: Option<&str>,
    json: bool,
    now: u64,
) -> Result<(), String> {
    let data = store.data().map_err(|e| e.to_string())?;
    let rows: Vec<_> = data
        .keys
        .iter()
        .filter(|k| customer.is_none_or(|c| c == k.customer))
        .map(|k| {
            let c = data.customers.get(&k.customer);
            let plan = c.and_then(|c| c.plan.clone());
            let status = match admin::status(k, now) {
                "active" | "expiring" if c.is_some_and(|c| c.is_suspended()) => "suspended",
                s => s,
            };
            (k, plan, status)
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(k, plan, status)| {
                serde_json::json!({
                    "id": k.id,
                    "start": k.start,
                    "customer": k.customer,
                    "plan": plan.clone().unwrap_or_else(|| config.plans.default_plan.name.to_string()),
                    "name": k.name,
                    "created": k.created,
                    "expires": k.expires,
                    "status": status,
                })
            })
            .collect();
        println!("{}", serde_json::Value::from(list));
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(k, plan, status)| {
            vec![
                k.id.clone(),
                format!("{}…", k.start),
                k.customer.clone(),
                plan.clone()
                    .unwrap_or_else(|| format!("{} (default)", config.plans.default_plan.name)),
                k.created.clone(),
                k.expires.clone().unwrap_or_else(|| "never".into()),
                (*status).to_owned(),
            ]
        })
        .collect();
    super::table::print(
        &[
            "ID", "KEY", "CUSTOMER", "PLAN", "CREATED", "EXPIRES", "STATUS",
        ],
        &cells,
        &[],
    );
    Ok(())
}
