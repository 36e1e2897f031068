//! The `tollgate` command line: run the proxy, check config, manage keys
//! and customers, show usage.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use tollgate::clock::{Clock, SystemClock};
use tollgate::config::{parse_duration, Config};
use tollgate::store::admin::{self, CreateKey};
use tollgate::store::{AnyStore, UpdateStore};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering reverse proxy: API keys, plan limits and usage in front of any HTTP API"
)]
struct Cli {
    /// Config file (also from TOLLGATE_CONFIG).
    #[arg(
        short,
        long,
        global = true,
        env = "TOLLGATE_CONFIG",
        default_value = "tollgate.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the proxy.
    Run,
    /// Validate config, plans and key store; exit 1 on any error.
    Check,
    /// Create, list, revoke and rotate API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Change customers' plans or suspend them.
    #[command(subcommand)]
    Customers(CustomersCmd),
    /// Usage this period and remaining quota, from the running proxy.
    Usage {
        #[arg(long)]
        customer: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Print a new key on stdout, once.
    Create {
        #[arg(long)]
        customer: String,
        /// Also set the customer's plan.
        #[arg(long)]
        plan: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 90d.
        #[arg(long)]
        expires: Option<String>,
    },
    List {
        #[arg(long)]
        customer: Option<String>,
    },
    Revoke {
        id: String,
    },
    /// Issue a replacement key; the old one expires after the grace period.
    Rotate {
        id: String,
        #[arg(long, default_value = "24h")]
        grace: String,
    },
}

#[derive(Subcommand)]
enum CustomersCmd {
    SetPlan {
        id: String,
        plan: String,
    },
    /// Refuse the customer's keys with 403 until resumed.
    Suspend {
        id: String,
    },
    Resume {
        id: String,
    },
}

/// mimalloc: fewer cycles per request than glibc's malloc under Pingora's
/// many small allocations (measured in benches/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|d| format!("{} has errors:\n{d}", path.display()))
}

fn duration_ms(s: &str, what: &str) -> Result<u64, String> {
    parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| format!("--{what} `{s}` is not a duration (e.g. 90d, 24h, 30m)"))
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let now = SystemClock.now_ms();
    match cli.command {
        Command::Run => {
            let config = Arc::new(load(&cli.config)?);
            if config.admin.token.is_none() {
                log::warn!(
                    "{} is not set: the /admin API is disabled",
                    config.admin.token_env
                );
            }
            let (server, _app) = tollgate::server::build(config.clone(), Arc::new(SystemClock))?;
            log::info!(
                "tollgate listening on {} in front of {}:{}, admin on {}",
                config.listen,
                config.upstream.host,
                config.upstream.port,
                config.admin.listen
            );
            server.run_forever();
        }
        Command::Check => {
            let errors = match Config::load(&cli.config) {
                Ok(config) => check_store(&config, now),
                Err(d) => d.0.iter().map(ToString::to_string).collect(),
            };
            if errors.is_empty() {
                eprintln!("{}: ok", cli.config.display());
                Ok(ExitCode::SUCCESS)
            } else {
                for e in &errors {
                    println!("{e}");
                }
                eprintln!("{} error(s)", errors.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Keys(cmd) => {
            let config = load(&cli.config)?;
            keys(cmd, &config, &open_store(&config)?, now)
        }
        Command::Customers(cmd) => {
            let config = load(&cli.config)?;
            customers(cmd, &config, &open_store(&config)?)
        }
        Command::Usage { customer } => {
            let config = load(&cli.config)?;
            usage(&config, customer.as_deref())
        }
    }
}

fn customers(
    cmd: CustomersCmd,
    config: &Config,
    store: &impl UpdateStore,
) -> Result<ExitCode, String> {
    match cmd {
        CustomersCmd::SetPlan { id, plan } => {
            known_plan(config, &plan)?;
            admin::set_plan(store, &id, &plan).map_err(|e| e.to_string())?;
            eprintln!("customer {id} is now on plan {plan}");
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

fn open_store(config: &Config) -> Result<AnyStore, String> {
    AnyStore::open(config).map_err(|e| e.to_string())
}

fn known_plan(config: &Config, plan: &str) -> Result<(), String> {
    if config.plans.get(plan).is_some() {
        Ok(())
    } else {
        let names: Vec<&str> = config.plans.plans.keys().map(String::as_str).collect();
        Err(format!(
            "unknown plan `{plan}` (known: {})",
            names.join(", ")
        ))
    }
}

/// Problems in the key store (unreadable, unknown plans, broken records),
/// located at the line of the record in the file.
fn check_store(config: &Config, _now: u64) -> Vec<String> {
    let (data, text, path) = match open_store(config) {
        Err(e) => return vec![format!("{}:1:1: error: {e}", config.file.display())],
        Ok(AnyStore::File(store)) => {
            let path = config.keys_path.display().to_string();
            match store.data() {
                Ok(d) => (
                    d,
                    std::fs::read_to_string(&config.keys_path).unwrap_or_default(),
                    path,
                ),
                Err(e) => return vec![format!("{path}:1:1: error: {e}")],
            }
        }
        Ok(AnyStore::Redis(store)) => {
            let path = format!(
                "redis {}",
                config
                    .redis
                    .as_ref()
                    .map(|r| r.urls.join(","))
                    .unwrap_or_default()
            );
            match store.data() {
                Ok(d) => (d, String::new(), path),
                Err(e) => return vec![format!("{path}: error: {e}")],
            }
        }
    };
    // The line and column where `needle` first stands in the file.
    let at = |needle: &str| -> String {
        text.lines()
            .enumerate()
            .find_map(|(i, l)| {
                l.find(needle)
                    .map(|c| format!("{path}:{}:{}", i + 1, c + 1))
            })
            .unwrap_or_else(|| {
                if text.is_empty() {
                    format!("{path} ({needle})")
                } else {
                    format!("{path}:1:1")
                }
            })
    };
    let mut errors = Vec::new();
    for (id, c) in &data.customers {
        if let Some(plan) = &c.plan {
            if config.plans.get(plan).is_none() {
                errors.push(format!(
                    "{}: error: customer {id} is on plan `{plan}`, which {} does not define\n  hint: it gets the default plan until you run `tollgate customers set-plan {id} <plan>`",
                    at(&format!("\"{id}\"")),
                    config.plans_file.display()
                ));
            }
        }
    }
    let mut ids = std::collections::HashSet::new();
    for k in &data.keys {
        let loc = at(&format!("\"{}\"", k.id));
        if !tollgate::keys::valid_key_id(&k.id) || !ids.insert(&k.id) {
            errors.push(format!(
                "{loc}: error: key id `{}` is malformed or duplicated",
                k.id
            ));
        }
        if k.hash.len() != 64 || hex::decode(&k.hash).is_err() {
            errors.push(format!("{loc}: error: key {} has a malformed hash\n  hint: the key cannot be used; revoke it and create a new one", k.id));
        }
        for (field, value) in [
            ("created", Some(&k.created)),
            ("expires", k.expires.as_ref()),
            ("revoked", k.revoked.as_ref()),
        ] {
            if let Some(v) = value {
                if tollgate::clock::parse_rfc3339(v).is_none() {
                    errors.push(format!(
                        "{loc}: error: key {} has `{field}: {v}`, not a time like 2026-01-31T12:00:00Z\n  hint: an expiry that does not parse is treated as already expired",
                        k.id
                    ));
                }
            }
        }
    }
    errors
}

fn keys(
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
        KeysCmd::List { customer } => {
            let data = store.data().map_err(|e| e.to_string())?;
            println!(
                "{:<21} {:<14} {:<24} {:<12} {:<21} {:<21} STATUS",
                "ID", "KEY", "CUSTOMER", "PLAN", "CREATED", "EXPIRES"
            );
            for k in data
                .keys
                .iter()
                .filter(|k| customer.as_ref().is_none_or(|c| *c == k.customer))
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
        }
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

/// Asks the running proxy's admin API and prints a table.
fn usage(config: &Config, customer: Option<&str>) -> Result<ExitCode, String> {
    let token = config.admin.token.as_deref().ok_or_else(|| {
        format!("{} is not set: `tollgate usage` reads usage from the running proxy's admin API with that token", config.admin.token_env)
    })?;
    let mut path = "/admin/usage".to_string();
    if let Some(c) = customer {
        path.push_str("?customer=");
        path.push_str(&tollgate::pct::encode(c, tollgate::pct::unreserved));
    }
    let body = http_get(config.admin.listen, &path, token)?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body)
        .map_err(|e| format!("unexpected answer from the admin API: {e}"))?;
    if list.is_empty() {
        eprintln!("no customers yet");
        return Ok(ExitCode::SUCCESS);
    }
    println!("LIMITS");
    println!(
        "{:<24} {:<12} {:<14} {:>14} {:>12} {:>9}",
        "CUSTOMER", "PLAN", "POLICY", "USED/LIMIT", "REMAINING", "RESET"
    );
    for u in &list {
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
    println!();
    println!("USAGE THIS MONTH");
    println!(
        "{:<24} {:<12} {:<14} {:>12} {:>12} {:>12}",
        "CUSTOMER", "PLAN", "METER", "RECORDED", "REPORTED", "PENDING"
    );
    for u in &list {
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
