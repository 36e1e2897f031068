//! The command line's arguments, and which command does what.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tollgate::app::Keys;
use tollgate::config::Config;
use tollgate_core::clock::{parse_duration, Clock, SystemClock};

use clap::{Parser, Subcommand};

mod admin_client;
mod billing;
mod check;
mod customers;
mod docs;
mod keys;
mod table;
mod usage;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering reverse proxy: API keys, plan limits and usage in front of any HTTP API"
)]
pub struct Cli {
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
    Run {
        /// Take over from the Tollgate running this config without dropping
        /// a connection: start this, then send the running one SIGQUIT
        /// (`kill -QUIT $(cat <spool_dir>/tollgate.pid)`) within 60 s.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate config, plans and key store; exit 1 on any error.
    Check,
    /// Create, list, revoke and rotate API keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Change customers' plans or suspend them.
    #[command(subcommand)]
    Customers(CustomersCmd),
    /// Write the consumer documentation: index.html, a Postman collection
    /// and, with --openapi, the upstream's OpenAPI document with Tollgate's
    /// security schemes, headers and errors.
    Docs {
        /// The directory to write (made if missing).
        #[arg(long)]
        out: PathBuf,
        /// Where consumers call the API (default: this config's listen address).
        #[arg(long)]
        base_url: Option<String>,
        /// The upstream API's OpenAPI 3.0 or 3.1 document (JSON or YAML).
        #[arg(long)]
        openapi: Option<PathBuf>,
    },
    /// Usage this period and remaining quota, from the running proxy's
    /// admin API (needs the admin token).
    Usage {
        /// Only this customer (exit 1 if the store does not know it).
        #[arg(long)]
        customer: Option<String>,
        /// The admin API's JSON instead of the tables.
        #[arg(long)]
        json: bool,
    },
    /// What each billing sink still owes, and the usage it refused.
    #[command(subcommand)]
    Billing(BillingCmd),
}

#[derive(Subcommand)]
pub(crate) enum BillingCmd {
    /// Each sink's pending units, lag and dead letters (read from the
    /// spool's files; works beside a running proxy).
    Status {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Usage a sink refused for good, with the reason.
    DeadLetters {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the sink's queue under their original
    /// identifiers, so a provider that did take one de-duplicates it.
    /// Through the running proxy's admin API when it holds the spool.
    Replay {
        #[arg(long)]
        sink: String,
        /// Only these identifiers (repeatable; default: all of the sink's).
        #[arg(long)]
        id: Vec<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Print a new key on stdout, once (everything else goes to stderr).
    Create {
        /// The customer the key belongs to (made if new).
        #[arg(long)]
        customer: String,
        /// The plan of a new customer (with --set-plan, also of an existing one).
        #[arg(long)]
        plan: Option<String>,
        /// A label for the key, e.g. the consumer's app.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 90d.
        #[arg(long)]
        expires: Option<String>,
        /// Let --plan change the plan of a customer that already has one
        /// (and so of all its keys).
        #[arg(long)]
        set_plan: bool,
    },
    /// Every key: id, start, customer, plan, created, expires, status
    /// (active, expiring within 7 days, expired, revoked, or suspended).
    /// Never the key itself.
    List {
        /// Only this customer's keys.
        #[arg(long)]
        customer: Option<String>,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Refuse the key from now on (401).
    Revoke {
        /// The key's id (`key_…`, as `keys list` shows it).
        id: String,
    },
    /// Issue a replacement key; the old one expires after the grace period.
    Rotate {
        /// The key's id (`key_…`).
        id: String,
        /// How long the old key stays valid, e.g. 24h or 7d.
        #[arg(long, default_value = "24h")]
        grace: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum CustomersCmd {
    /// Every customer in the key store: plan, suspension, subscription,
    /// own limits, keys.
    List {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// One customer, with its keys.
    Show {
        /// The customer's id.
        id: String,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Move the customer (all its keys) to another plan; running proxies
    /// apply it within a second.
    SetPlan {
        /// The customer's id.
        id: String,
        /// A plan of plans.yaml.
        plan: String,
    },
    /// Give the customer its own limits instead of its plan's, from a YAML
    /// file holding `limits: [...]` shaped as in plans.yaml.
    SetLimits {
        /// The customer's id.
        id: String,
        /// The YAML file with `limits:`.
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Back to the plan's limits.
    ClearLimits {
        /// The customer's id.
        id: String,
    },
    /// Refuse the customer's keys with 403 until resumed.
    Suspend {
        /// The customer's id.
        id: String,
    },
    /// Serve a suspended customer's keys again.
    Resume {
        /// The customer's id.
        id: String,
    },
}

pub(crate) fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|d| format!("{} has errors:\n{d}", path.display()))
}

/// For commands that use no secret: sink and spool keys may be unset.
fn load_without_secrets(path: &std::path::Path) -> Result<Config, String> {
    Config::load_without_secrets(path).map_err(|d| format!("{} has errors:\n{d}", path.display()))
}

/// Every address the process listens on is free, or it does not start:
/// one line and a non-zero exit, not Pingora's retries and panic.
fn listeners_free(config: &Config) -> Result<(), String> {
    for (what, addr) in [
        ("listen", config.listen),
        ("admin.listen", config.admin.listen),
    ] {
        std::net::TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))?;
    }
    Ok(())
}

pub(crate) fn duration_ms(s: &str, what: &str) -> Result<u64, String> {
    parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| format!("--{what} `{s}` is not a duration (e.g. 90d, 24h, 30m)"))
}

pub fn run(cli: Cli) -> Result<ExitCode, String> {
    let now = SystemClock.now_ms();
    match cli.command {
        Command::Run { upgrade } => {
            // The key store is checked as the app opens it (one read).
            let config = Arc::new(load(&cli.config)?);
            let pid_file = tollgate::server::pid_file(&config);
            if upgrade {
                log::info!(
                    "upgrade: waiting up to {} s for the running Tollgate to hand over its listeners: kill -QUIT $(cat {})",
                    tollgate::server::UPGRADE_WAIT_SECS,
                    pid_file.display()
                );
            } else {
                listeners_free(&config)?;
            }
            if config.keys_store == tollgate::config::StoreKind::File && !config.keys_path.exists()
            {
                log::warn!(
                    "key store {} does not exist yet: no key is valid until `tollgate keys create` makes one",
                    config.keys_path.display()
                );
            }
            if config.admin.token.is_none() {
                log::warn!(
                    "{} is not set: the /admin API is disabled",
                    config.admin.token_env
                );
            }
            let (server, app) =
                tollgate::server::build_as(config.clone(), Arc::new(SystemClock), upgrade)?;
            // Names the process holding the spool, for the next upgrade.
            let written = std::fs::create_dir_all(&config.metering.spool_dir)
                .and_then(|()| std::fs::write(&pid_file, format!("{}\n", std::process::id())));
            if let Err(e) = written {
                log::warn!("cannot write {}: {e}", pid_file.display());
            }
            // Counted in the snapshot the proxy serves from: reading the
            // store again to count it took 2 s and 700 MB at a million keys.
            let snap = app.keys.as_key_store().snapshot();
            log::info!(
                "loaded {} plans, {} keys, {} customers, {} sinks{}",
                config.plans.plans.len(),
                snap.key_count,
                snap.customer_ids().count(),
                config.metering.sinks.len(),
                config.alerts.as_ref().map_or(String::new(), |a| format!(
                    ", usage alerts at {:?} %",
                    a.at.as_slice()
                ))
            );
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
                Ok(config) => check::check_store(&config, now),
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
            let config = load_without_secrets(&cli.config)?;
            keys::keys(cmd, &config, &open_store(&config)?, now)
        }
        Command::Customers(cmd) => {
            let config = load_without_secrets(&cli.config)?;
            customers::customers(cmd, &config, &open_store(&config)?)
        }
        Command::Docs {
            out,
            base_url,
            openapi,
        } => {
            let config = load_without_secrets(&cli.config)?;
            docs::write(&config, &out, base_url.as_deref(), openapi.as_deref())
        }
        Command::Billing(cmd) => billing::billing(cmd, &load_without_secrets(&cli.config)?),
        Command::Usage { customer, json } => {
            let config = load_without_secrets(&cli.config)?;
            // A customer the store does not know (and that has no usage,
            // as a JWT-only customer would) is a typo, not an empty report.
            let known = match &customer {
                Some(c) => {
                    let data = tollgate_core::store::UpdateStore::data(&open_store(&config)?)
                        .map_err(|e| e.to_string())?;
                    data.customers.contains_key(c) || data.keys.iter().any(|k| &k.customer == c)
                }
                None => true,
            };
            usage::usage(&config, customer.as_deref(), json, known)
        }
    }
}

pub(crate) fn open_store(config: &Config) -> Result<Keys, String> {
    Keys::open(config).map_err(|e| e.to_string())
}

pub(crate) fn known_plan(config: &Config, plan: &str) -> Result<(), String> {
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
