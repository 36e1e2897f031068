//! `billing_webhooks:`: which providers' webhooks Tollgate follows, with
//! their secrets and how their prices map to plans.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_core::diag::Check;
use tollgate_core::lifecycle::{OnPastDue, Policy, Provider};
use tollgate_core::plans::Plans;

/// One provider's endpoint, validated.
#[derive(Clone)]
pub struct WebhookConfig {
    pub provider: Provider,
    /// The current secret first, then the previous one while it is rotated.
    pub secrets: Vec<String>,
    pub policy: Policy,
    /// How far a signed timestamp may be from now (not Paystack: it signs none).
    pub tolerance_secs: u64,
}

impl std::fmt::Debug for WebhookConfig {
    // Secrets stay out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookConfig({})", self.provider.name())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    secret_env: String,
    previous_secret_env: Option<String>,
    #[serde(default)]
    plans: BTreeMap<String, String>,
    on_cancel: Option<String>,
    on_past_due: Option<String>,
    tolerance: Option<String>,
}

/// The section, each provider read on its own so a mistake in one does not
/// hide the others.
pub(super) fn parse(
    cx: &mut Check<'_>,
    section: &serde_yaml::Value,
    plans: Option<&Plans>,
) -> Vec<WebhookConfig> {
    let Some(map) = section.as_mapping() else {
        cx.err(
            "billing_webhooks",
            "`billing_webhooks` is a mapping of providers",
            Some("e.g. billing_webhooks: { stripe: { secret_env: STRIPE_WEBHOOK_SECRET } }"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let name = k.as_str().unwrap_or_default();
        let Some(provider) = Provider::ALL.into_iter().find(|p| p.name() == name) else {
            let d = cx
                .src
                .unknown_key(&format!("billing_webhooks.{name}"), KNOWN);
            cx.d.0.push(d);
            continue;
        };
        let path = format!("billing_webhooks.{name}");
        if let Some(raw) = cx.typed::<RawProvider>(&path, v) {
            out.extend(provider_config(cx, provider, &raw, plans));
        }
    }
    out
}

const KNOWN: &str = "stripe, paystack, paddle, standard";

fn provider_config(
    cx: &mut Check<'_>,
    provider: Provider,
    r: &RawProvider,
    plans: Option<&Plans>,
) -> Option<WebhookConfig> {
    let p = format!("billing_webhooks.{}", provider.name());
    // Unknown plans are reported only when plans.yaml itself loaded.
    let plan = |cx: &mut Check<'_>, path: &str, name: &str| {
        if plans.is_some_and(|ps| ps.get(name).is_none()) {
            cx.err(
                path,
                format!("`{name}` is not a plan in plans.yaml"),
                Some("every price must map to a plan defined in plans.yaml"),
            );
        }
    };
    if provider == Provider::Standard {
        // The sender names the plan itself.
        for (set, field) in [
            (!r.plans.is_empty(), "plans"),
            (r.on_cancel.is_some(), "on_cancel"),
            (r.on_past_due.is_some(), "on_past_due"),
        ] {
            if set {
                cx.err(
                    &format!("{p}.{field}"),
                    format!("`{field}` does not apply to Standard Webhooks"),
                    Some("the sender names the plan in customer.plan_changed"),
                );
            }
        }
    }
    for (source, name) in &r.plans {
        plan(cx, &format!("{p}.plans.{source}"), name);
    }
    if let Some(name) = &r.on_cancel {
        plan(cx, &format!("{p}.on_cancel"), name);
    }
    let on_past_due = match r.on_past_due.as_deref() {
        None | Some("keep") => OnPastDue::Keep,
        Some("suspend") => OnPastDue::Suspend,
        Some(name) => {
            plan(cx, &format!("{p}.on_past_due"), name);
            OnPastDue::Plan(name.to_owned())
        }
    };
    if provider == Provider::Paystack && r.tolerance.is_some() {
        cx.err(
            &format!("{p}.tolerance"),
            "Paystack signs no timestamp, so there is no tolerance to set",
            None,
        );
    }
    let tolerance = cx.duration(
        &format!("{p}.tolerance"),
        r.tolerance.as_deref(),
        Duration::from_secs(300),
    );
    let mut secrets = vec![cx.secret(&format!("{p}.secret_env"), &r.secret_env)?];
    if let Some(prev) = &r.previous_secret_env {
        secrets.push(cx.secret(&format!("{p}.previous_secret_env"), prev)?);
    }
    // A Standard Webhooks secret is base64 key material: a few bytes (or
    // a bare `whsec_`) would be a guessable HMAC key.
    if provider == Provider::Standard {
        let short = secrets.iter().any(|s| {
            !s.is_empty() && tollgate_core::lifecycle::signature::webhook_key(s).len() < 16
        });
        if short {
            cx.err(
                &format!("{p}.secret_env"),
                "a Standard Webhooks secret must hold at least 16 bytes of key",
                Some("`whsec_` followed by base64, e.g. whsec_$(openssl rand -base64 32)"),
            );
        }
    }
    Some(WebhookConfig {
        provider,
        secrets,
        policy: Policy {
            plans: r.plans.clone(),
            on_cancel: r.on_cancel.clone(),
            on_past_due,
        },
        tolerance_secs: tolerance.as_secs(),
    })
}
