//! `tollgate customers …`: change plans, suspend and resume.

use std::process::ExitCode;

use tollgate::config::Config;
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
