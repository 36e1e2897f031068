//! `tollgate customers …`: change plans and limits, suspend and resume.

use std::process::ExitCode;

use tollgate::config::Config;
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
