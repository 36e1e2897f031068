//! `tollgate usage`: the running proxy's usage report, as a table.

use std::process::ExitCode;

use tollgate::config::Config;

use super::table::{self, human};

/// Asks the running proxy's admin API and prints a table.
pub(super) fn usage(
    config: &Config,
    customer: Option<&str>,
    json: bool,
    known: bool,
) -> Result<ExitCode, String> {
    let mut path = "/admin/usage".to_string();
    if let Some(c) = customer {
        path.push_str("?customer=");
        path.push_str(&tollgate_core::pct::encode(
            c,
            tollgate_core::pct::unreserved,
        ));
    }
    let body = super::admin_client::call(config, "usage", "GET", &path, None)?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body)
        .map_err(|e| format!("unexpected answer from the admin API: {e}"))?;
    let untouched = |r: &serde_json::Value| {
        r["usage"].as_object().is_none_or(|u| u.is_empty())
            && r["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|p| p["remaining"] == p["limit"])
    };
    if let (Some(c), false) = (customer, known) {
        if list.iter().all(untouched) {
            return Err(format!("no customer `{c}` in the key store, and no usage"));
        }
    }
    if json {
        println!("{}", serde_json::Value::from(list));
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        eprintln!("no customers yet");
        return Ok(ExitCode::SUCCESS);
    }
    print_limits(&list);
    println!();
    print_credits(&list);
    print_usage(&list);
    Ok(ExitCode::SUCCESS)
}

/// Prepaid balances, for the customers whose plan has credits.
fn print_credits(list: &[serde_json::Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .filter(|u| u["credits"].is_object())
        .map(|u| {
            let n = |k: &str| u["credits"][k].as_i64().unwrap_or(0).to_string();
            vec![
                u["customer"].as_str().unwrap_or("").to_owned(),
                u["plan"].as_str().unwrap_or("").to_owned(),
                n("remaining"),
                n("granted"),
                n("used"),
            ]
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!("CREDITS THIS PERIOD");
    table::print(
        &["CUSTOMER", "PLAN", "REMAINING", "GRANTED", "USED"],
        &rows,
        &[2, 3, 4],
    );
    println!();
}

/// Where each customer stands against each policy of its plan.
fn print_limits(list: &[serde_json::Value]) {
    println!("LIMITS");
    let mut rows = Vec::new();
    for u in list {
        let (c, p) = (
            u["customer"].as_str().unwrap_or(""),
            u["plan"].as_str().unwrap_or(""),
        );
        for pol in u["policies"].as_array().into_iter().flatten() {
            let limit = pol["limit"].as_u64().unwrap_or(0);
            let remaining = pol["remaining"].as_u64().unwrap_or(0);
            rows.push(vec![
                c.to_owned(),
                p.to_owned(),
                pol["name"].as_str().unwrap_or("").to_owned(),
                format!("{}/{}", limit - remaining.min(limit), limit),
                remaining.to_string(),
                human(pol["reset"].as_u64().unwrap_or(0)),
            ]);
        }
    }
    table::print(
        &[
            "CUSTOMER",
            "PLAN",
            "POLICY",
            "USED/LIMIT",
            "REMAINING",
            "RESET",
        ],
        &rows,
        &[3, 4, 5],
    );
}

/// What each customer used this month, and how much of it reached billing.
fn print_usage(list: &[serde_json::Value]) {
    println!("USAGE THIS MONTH");
    let mut rows = Vec::new();
    for u in list {
        let (c, p) = (
            u["customer"].as_str().unwrap_or(""),
            u["plan"].as_str().unwrap_or(""),
        );
        let row = |meter: &str, cells: [String; 3]| {
            let [a, b, d] = cells;
            vec![c.to_owned(), p.to_owned(), meter.to_owned(), a, b, d]
        };
        match u["billing"].as_object().filter(|b| !b.is_empty()) {
            Some(b) => {
                for (meter, t) in b {
                    let n = |k: &str| t[k].as_u64().unwrap_or(0).to_string();
                    rows.push(row(meter, [n("recorded"), n("reported"), n("pending")]));
                }
            }
            // Metering disabled: what this process counted.
            None => {
                for (meter, n) in u["usage"].as_object().into_iter().flatten() {
                    rows.push(row(meter, [n.to_string(), "-".into(), "-".into()]));
                }
            }
        }
    }
    table::print(
        &[
            "CUSTOMER", "PLAN", "METER", "RECORDED", "REPORTED", "PENDING",
        ],
        &rows,
        &[3, 4, 5],
    );
}
