//! `tollgate usage`: the running proxy's usage report, as a table.

use std::io::{Read, Write};
use std::process::ExitCode;

use tollgate::config::Config;

/// Asks the running proxy's admin API and prints a table.
pub(super) fn usage(
    config: &Config,
    customer: Option<&str>,
    json: bool,
    known: bool,
) -> Result<ExitCode, String> {
    let token = config.admin.token.as_deref().ok_or_else(|| {
        format!("{} is not set: `tollgate usage` reads usage from the running proxy's admin API with that token", config.admin.token_env)
    })?;
    let mut path = "/admin/usage".to_string();
    if let Some(c) = customer {
        path.push_str("?customer=");
        path.push_str(&tollgate_core::pct::encode(
            c,
            tollgate_core::pct::unreserved,
        ));
    }
    let body = http_get(config.admin.listen, &path, token)?;
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
    print_usage(&list);
    Ok(ExitCode::SUCCESS)
}

fn http_get(addr: std::net::SocketAddr, path: &str, token: &str) -> Result<String, String> {
    let fail = |e: std::io::Error| {
        format!("cannot reach the admin API at {addr} (is `tollgate run` up?): {e}")
    };
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map_err(fail)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(fail)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").map_err(fail)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(fail)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed answer from the admin API")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("admin API answered {status}: {body}"));
    }
    Ok(body.to_owned())
}

/// Where each customer stands against each policy of its plan.
fn print_limits(list: &[serde_json::Value]) {
    println!("LIMITS");
    println!(
        "{:<24} {:<12} {:<14} {:>14} {:>12} {:>9}",
        "CUSTOMER", "PLAN", "POLICY", "USED/LIMIT", "REMAINING", "RESET"
    );
    for u in list {
        let (c, p) = (
            u["customer"].as_str().unwrap_or(""),
            u["plan"].as_str().unwrap_or(""),
        );
        for pol in u["policies"].as_array().into_iter().flatten() {
            let limit = pol["limit"].as_u64().unwrap_or(0);
            let remaining = pol["remaining"].as_u64().unwrap_or(0);
            println!(
                "{:<24} {:<12} {:<14} {:>14} {:>12} {:>8}s",
                c,
                p,
                pol["name"].as_str().unwrap_or(""),
                format!("{}/{}", limit - remaining.min(limit), limit),
                remaining,
                pol["reset"].as_u64().unwrap_or(0)
            );
        }
    }
}

/// What each customer used this month, and how much of it reached billing.
fn print_usage(list: &[serde_json::Value]) {
    println!("USAGE THIS MONTH");
    println!(
        "{:<24} {:<12} {:<14} {:>12} {:>12} {:>12}",
        "CUSTOMER", "PLAN", "METER", "RECORDED", "REPORTED", "PENDING"
    );
    for u in list {
        let (c, p) = (
            u["customer"].as_str().unwrap_or(""),
            u["plan"].as_str().unwrap_or(""),
        );
        let billing = u["billing"].as_object().filter(|b| !b.is_empty());
        match billing {
            Some(b) => {
                for (meter, t) in b {
                    let n = |k: &str| t[k].as_u64().unwrap_or(0);
                    println!(
                        "{:<24} {:<12} {:<14} {:>12} {:>12} {:>12}",
                        c,
                        p,
                        meter,
                        n("recorded"),
                        n("reported"),
                        n("pending")
                    );
                }
            }
            // Metering disabled: what this process counted.
            None => {
                for (meter, n) in u["usage"].as_object().into_iter().flatten() {
                    println!(
                        "{:<24} {:<12} {:<14} {:>12} {:>12} {:>12}",
                        c, p, meter, n, "-", "-"
                    );
                }
            }
        }
    }
}
