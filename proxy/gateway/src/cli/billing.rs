//! `tollgate billing status | dead-letters | replay`: what each sink still
//! owes, what it refused for good, and putting that back in its queue.
//!
//! `status` and `dead-letters` read the spool's files (they work beside a
//! running proxy, and without one). `replay` changes the spool: it opens
//! it when no proxy holds it, else asks the proxy that does through
//! `POST /admin/billing/replay`.

use std::process::ExitCode;
use std::sync::Arc;

use tollgate::app::spool_config;
use tollgate::config::Config;
use tollgate_core::clock::{rfc3339, Clock, SystemClock};
use tollgate_metering::spool::{self, DeadLetter, Spool, SpoolError};

use super::table::{self, human};
use super::BillingCmd;

pub(super) fn billing(cmd: BillingCmd, config: &Config) -> Result<ExitCode, String> {
    if !config.metering.enabled {
        return Err("metering.enabled is false: there is no usage spool".into());
    }
    let sc = spool_config(config);
    let known = |sink: &str| -> Result<(), String> {
        let alerts = sink == tollgate_metering::alerts::ALERTS && config.alerts.is_some();
        if alerts || sc.sinks.iter().any(|s| s == sink) {
            Ok(())
        } else {
            let mut names = sc.sinks.clone();
            if config.alerts.is_some() {
                names.push(tollgate_metering::alerts::ALERTS.into());
            }
            if names.is_empty() {
                Err(format!("no sink `{sink}`: metering.sinks is empty"))
            } else {
                Err(format!(
                    "no sink `{sink}` (configured: {})",
                    names.join(", ")
                ))
            }
        }
    };
    let now = SystemClock.now_ms();
    match cmd {
        BillingCmd::Status { json } => {
            let st = Spool::inspect(&sc, now).map_err(|e| e.to_string())?;
            let doc = tollgate::admin::billing::status_json(&st, now);
            if json {
                println!("{doc}");
            } else if st.sinks.is_empty() {
                eprintln!("no sinks configured (metering.sinks): usage is only spooled");
            } else {
                let rows: Vec<Vec<String>> = st
                    .sinks
                    .iter()
                    .map(|s| {
                        vec![
                            s.sink.clone(),
                            s.pending_units.to_string(),
                            s.oldest
                                .map_or("-".into(), |o| human(now.saturating_sub(o) / 1000)),
                            s.dead_letters.to_string(),
                        ]
                    })
                    .collect();
                table::print(
                    &["SINK", "PENDING", "LAG", "DEAD LETTERS"],
                    &rows,
                    &[1, 2, 3],
                );
            }
        }
        BillingCmd::DeadLetters { sink, json } => {
            if let Some(s) = &sink {
                known(s)?;
            }
            if sink.as_deref() == Some(tollgate_metering::alerts::ALERTS) {
                return dead_alerts(&sc, json);
            }
            let mut all: Vec<DeadLetter> = Vec::new();
            for s in sc
                .sinks
                .iter()
                .filter(|s| sink.as_ref().is_none_or(|x| x == *s))
            {
                all.extend(spool::dead_letters(&sc.dir, s, sc.seal.as_deref()));
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&all).map_err(|e| e.to_string())?
                );
            } else if all.is_empty() {
                eprintln!("no dead letters");
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|d| {
                        vec![
                            d.sink.clone(),
                            d.identifier.clone(),
                            d.customer.clone(),
                            d.meter.clone(),
                            d.units.to_string(),
                            rfc3339(d.window_start),
                            d.reason.clone(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "SINK", "ID", "CUSTOMER", "METER", "UNITS", "WINDOW", "REASON",
                    ],
                    &rows,
                    &[4],
                );
            }
        }
        BillingCmd::Replay { sink, id } => {
            known(&sink)?;
            let ids = (!id.is_empty()).then_some(id);
            let (replayed, missing) = replay(config, &sink, ids)?;
            for i in &replayed {
                println!("{i}");
            }
            eprintln!(
                "{} dead letter(s) back in the queue of {sink} under their original identifiers",
                replayed.len()
            );
            if !missing.is_empty() {
                return Err(format!(
                    "not dead letters of {sink}: {}",
                    missing.join(", ")
                ));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dead-letters --sink alerts`: the alert events the webhook refused.
fn dead_alerts(sc: &spool::SpoolConfig, json: bool) -> Result<ExitCode, String> {
    let all = spool::dead_alerts(&sc.dir, sc.seal.as_deref());
    if json {
        println!("{}", serde_json::Value::from(all));
    } else if all.is_empty() {
        eprintln!("no dead letters");
    } else {
        let rows: Vec<Vec<String>> = all
            .iter()
            .map(|v| {
                let d = &v["event"]["data"];
                let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
                vec![
                    s(&v["id"]),
                    s(&d["customer"]),
                    s(&d["policy"]),
                    d["percent"].to_string(),
                    s(&d["period_start"]),
                    s(&v["reason"]),
                ]
            })
            .collect();
        table::print(
            &["ID", "CUSTOMER", "POLICY", "PERCENT", "PERIOD", "REASON"],
            &rows,
            &[3],
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The identifiers put back, and the asked-for ones that are not dead
/// letters of `sink`.
fn replay(
    config: &Config,
    sink: &str,
    ids: Option<Vec<String>>,
) -> Result<(Vec<String>, Vec<String>), String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let replayed = match Spool::open(spool_config(config), clock) {
        Ok(sp) => {
            let r = sp.replay(sink, ids.as_deref()).map_err(|e| e.to_string())?;
            sp.close();
            r
        }
        Err(SpoolError::InUse(_)) => {
            let body = match &ids {
                Some(ids) => serde_json::json!({ "sink": sink, "ids": ids }),
                None => serde_json::json!({ "sink": sink }),
            };
            let answer = super::admin_client::call(
                config,
                "billing replay",
                "POST",
                "/admin/billing/replay",
                Some(&body.to_string()),
            )?;
            let v: serde_json::Value = serde_json::from_str(&answer)
                .map_err(|e| format!("unexpected answer from the admin API: {e}"))?;
            v["replayed"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        }
        Err(e) => return Err(e.to_string()),
    };
    let missing = ids
        .into_iter()
        .flatten()
        .filter(|i| !replayed.contains(i))
        .collect();
    Ok((replayed, missing))
}
