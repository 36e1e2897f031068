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
        KeysCmd::List { customer } => list(config, store, customer.as_deref(), now)?,
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

/// `keys list`: every key (or one customer's), never the key itself.
fn list(
    config: &Config,
    store: &impl UpdateStore,
    customer: Option<&str>,
    now: u64,
) -> Result<(), String> {
    let data = store.data().map_err(|e| e.to_string())?;
    println!(
        "{:<21} {:<14} {:<24} {:<12} {:<21} {:<21} STATUS",
        "ID", "KEY", "CUSTOMER", "PLAN", "CREATED", "EXPIRES"
    );
    for k in data
        .keys
        .iter()
        .filter(|k| customer.is_none_or(|c| c == k.customer))
    {
        let plan = data
            .customers
            .get(&k.customer)
            .and_then(|c| c.plan.clone())
            .unwrap_or_else(|| format!("{} (default)", config.plans.default_plan.name));
        println!(
            "{:<21} {:<14} {:<24} {:<12} {:<21} {:<21} {}",
            k.id,
            format!("{}…", k.start),
            k.customer,
            plan,
            k.created,
            k.expires.as_deref().unwrap_or("never"),
            admin::status(k, now)
        );
    }
    Ok(())
}
