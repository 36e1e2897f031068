//! `tollgate customers …`: change plans and limits, suspend and resume.

use std::process::ExitCode;

use tollgate::config::Config;
use tollgate_core::clock::Clock;
use tollgate_core::diag::Source;
use tollgate_core::plans::custom::{parse_limit_specs, LimitSpec};
use tollgate_core::store::admin;
use tollgate_core::store::UpdateStore;

use super::{known_plan, CustomersCmd};

pub(super) fn customers(
    cmd: CustomersCmd,
    config: &Config,
    store: &impl UpdateStore,
) -> Result<ExitCode, String> {
    match cmd {
        CustomersCmd::List { json } => {
            let data = store.data().map_err(|e| e.to_string())?;
            let rows: Vec<serde_json::Value> = data
                .customers
                .keys()
                .map(|id| describe(config, &data, id))
                .collect();
            if json {
                println!("{}", serde_json::Value::from(rows));
            } else if rows.is_empty() {
                eprintln!("no customers yet");
            } else {
                table(&rows);
            }
        }
        CustomersCmd::Show { id, json } => {
            let data = store.data().map_err(|e| e.to_string())?;
            if !data.customers.contains_key(&id) && !data.keys.iter().any(|k| k.customer == id) {
                return Err(format!("no customer `{id}` in the key store"));
            }
            let mut row = describe(config, &data, &id);
            let now = tollgate_core::clock::SystemClock.now_ms();
            row["key_ids"] = data
                .keys
                .iter()
                .filter(|k| k.customer == id)
                .map(|k| serde_json::json!({"id": k.id, "start": k.start, "name": k.name, "status": admin::status(k, now)}))
                .collect::<Vec<_>>()
                .into();
            if json {
                println!("{row}");
            } else {
                table(std::slice::from_ref(&row));
                for k in row["key_ids"].as_array().into_iter().flatten() {
                    println!(
                        "  {}  {}…  {}  {}",
                        k["id"].as_str().unwrap_or(""),
                        k["start"].as_str().unwrap_or(""),
                        k["status"].as_str().unwrap_or(""),
                        k["name"].as_str().unwrap_or("")
                    );
                }
            }
        }
        CustomersCmd::SetPlan { id, plan } => {
            known_plan(config, &plan)?;
            admin::set_plan(store, &id, &plan).map_err(|e| e.to_string())?;
            eprintln!("customer {id} is now on plan {plan}");
        }
        CustomersCmd::SetLimits { id, file } => {
            let specs = limits_file(&file)?;
            let n = specs.len();
            admin::set_limits(store, &id, Some(specs)).map_err(|e| e.to_string())?;
            eprintln!("customer {id} now has its own {n} limit(s); running proxies apply them within a second");
        }
        CustomersCmd::ClearLimits { id } => {
            admin::set_limits(store, &id, None).map_err(|e| e.to_string())?;
            eprintln!("customer {id} is back on its plan's limits");
        }
        CustomersCmd::Suspend { id } => {
            admin::set_suspended(store, &id, true).map_err(|e| e.to_string())?;
            eprintln!("customer {id} suspended: its keys now get 403");
        }
        CustomersCmd::Resume { id } => {
            admin::set_suspended(store, &id, false).map_err(|e| e.to_string())?;
            eprintln!("customer {id} resumed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `limits: [...]` from a YAML file, each error located at its line.
fn limits_file(path: &std::path::Path) -> Result<Vec<LimitSpec>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let src = Source::new(path, text);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&src.text).map_err(|e| src.syntax_error(&e).to_string())?;
    let json = serde_json::to_value(&yaml).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(list) = json.get("limits") else {
        return Err(src
            .error(
                "",
                "the file must hold `limits:` with a list of limits",
                Some("limits:\n  - { name: burst, requests: 100, per: second }"),
            )
            .to_string());
    };
    parse_limit_specs(list, "limits").map_err(|errs| {
        errs.fields
            .iter()
            .map(|(p, m)| src.error(p, format!("{p}: {m}"), None).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// What the store says of one customer.
fn describe(
    config: &Config,
    data: &tollgate_core::store::StoreData,
    id: &str,
) -> serde_json::Value {
    let c = data.customers.get(id).cloned().unwrap_or_default();
    let now = tollgate_core::clock::SystemClock.now_ms();
    let keys: Vec<_> = data.keys.iter().filter(|k| k.customer == id).collect();
    let active = keys
        .iter()
        .filter(|k| matches!(admin::status(k, now), "active" | "expiring"))
        .count();
    serde_json::json!({
        "id": id,
        "plan": c.plan.clone().unwrap_or_else(|| config.plans.default_plan.name.to_string()),
        "suspended": c.is_suspended(),
        "subscription": c.billing.as_ref().map(|b| b.status.as_str()),
        "limits": c.limits,
        "keys": {"active": active, "total": keys.len()},
    })
}

/// Aligned columns: id, plan, status, keys, own limits.
fn table(rows: &[serde_json::Value]) {
    let cell = |r: &serde_json::Value| {
        let status = if r["suspended"] == true {
            "suspended".to_owned()
        } else {
            r["subscription"].as_str().unwrap_or("-").to_owned()
        };
        vec![
            r["id"].as_str().unwrap_or("").to_owned(),
            r["plan"].as_str().unwrap_or("").to_owned(),
            status,
            format!("{}/{}", r["keys"]["active"], r["keys"]["total"]),
            if r["limits"].is_null() {
                "-".into()
            } else {
                "own".into()
            },
        ]
    };
    let body: Vec<Vec<String>> = rows.iter().map(cell).collect();
    super::table::print(
        &["CUSTOMER", "PLAN", "STATUS", "KEYS", "LIMITS"],
        &body,
        &[],
    );
}
