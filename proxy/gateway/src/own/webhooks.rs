//! `POST /_tollgate/webhooks/<provider>`: a bounded body, read in full,
//! its signature verified before anything parses it, then one atomic store
//! update (deduplicated, ordered) off the worker threads. Bad input is a
//! 400 problem and changes nothing; a verified event of a type that decides
//! no plan is a 200. A store that cannot be written is a 503, so the
//! provider retries the delivery rather than Tollgate losing it.

use tollgate_core::lifecycle::{self, events, signature, Applied, Provider};
use tollgate_core::metrics::{PLAN_CHANGES, WEBHOOK_EVENTS};
use tollgate_core::store::{Only, StoreError, UpdateStore};

use super::{header_str, read_body, BodyError, Reply};
use crate::app::App;

/// The largest delivery accepted (Stripe's events are a few KiB).
pub const MAX_BODY: usize = 1 << 20;

fn count(provider: Provider, result: &str) {
    WEBHOOK_EVENTS
        .with_label_values(&[provider.name(), result])
        .inc();
}

fn rejected(provider: Provider, slug: &'static str, title: &'static str, detail: String) -> Reply {
    count(provider, "rejected");
    log::warn!("{} webhook refused: {detail}", provider.name());
    Reply::problem(400, slug, title, detail)
}

fn ok(result: &str) -> Reply {
    Reply::json(
        200,
        format!("{{\"received\":true,\"result\":\"{result}\"}}"),
    )
}

pub async fn receive(
    app: &App,
    session: &mut pingora::proxy::Session,
    provider: Provider,
) -> Reply {
    let live = app.live();
    let Some(cfg) = live.webhook(provider) else {
        return Reply::not_found();
    };
    let body = match read_body(session, MAX_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return rejected(
                provider,
                "webhook-body-too-large",
                "Webhook body too large",
                format!("a webhook body is at most {MAX_BODY} bytes"),
            )
        }
        Err(BodyError::Unreadable) => {
            return rejected(
                provider,
                "webhook-body-unreadable",
                "Webhook body unreadable",
                "the request body could not be read".into(),
            )
        }
    };
    let now = app.gate.clock.now_ms();
    let now_secs = now / 1000;
    let (secrets, tol) = (&cfg.secrets, cfg.tolerance_secs);
    let verified = match provider {
        Provider::Stripe => signature::stripe(
            header_str(session, "stripe-signature"),
            &body,
            secrets,
            now_secs,
            tol,
        )
        .map(|t| (None, Some(t))),
        Provider::Paddle => signature::paddle(
            header_str(session, "paddle-signature"),
            &body,
            secrets,
            now_secs,
            tol,
        )
        .map(|t| (None, Some(t))),
        Provider::Paystack => {
            signature::paystack(header_str(session, "x-paystack-signature"), &body, secrets)
                .map(|()| (None, None))
        }
        Provider::Standard => signature::standard(
            signature::StandardHeaders {
                id: header_str(session, "webhook-id"),
                timestamp: header_str(session, "webhook-timestamp"),
                signature: header_str(session, "webhook-signature"),
            },
            &body,
            secrets,
            now_secs,
            tol,
        )
        .map(|(id, t)| (Some(id.to_owned()), Some(t))),
    };
    let (id, ts) = match verified {
        Ok(v) => v,
        Err(e) => {
            return rejected(
                provider,
                "webhook-signature",
                "Webhook signature invalid",
                e.to_string(),
            )
        }
    };
    let event = match events::parse(provider, &body, id.as_deref(), ts, now) {
        Ok(Some(e)) => e,
        Ok(None) => {
            count(provider, "ignored");
            return ok("ignored");
        }
        Err(e) => {
            return rejected(
                provider,
                "webhook-body",
                "Webhook body invalid",
                e.to_string(),
            )
        }
    };
    if let lifecycle::Change::Credits(n) = event.change {
        return grant_pack(app, provider, &event, n, now).await;
    }
    apply(app, provider, cfg.policy.clone(), event, now).await
}

/// A paid credit pack: granted once, keyed by its Checkout Session, so
/// Stripe's retries, or a second event about the same purchase, grant
/// nothing more.
async fn grant_pack(
    app: &App,
    provider: Provider,
    event: &lifecycle::Event,
    credits: u64,
    now: u64,
) -> Reply {
    let customer: std::sync::Arc<str> = event.customer.as_str().into();
    let grant = tollgate_core::credits::Grant {
        at: now,
        amount: i64::try_from(credits).unwrap_or(i64::MAX),
        // One grant per purchase, whichever of its events arrives.
        idempotency_key: Some(format!(
            "{}:{}",
            provider.name(),
            event.purchase.as_deref().unwrap_or(&event.id)
        )),
        reason: format!("credit pack ({})", event.kind),
        source: tollgate_core::credits::Source::Stripe,
    };
    match crate::admin::credits::grant(app, customer, grant).await {
        Ok((tollgate_core::credits::Granted::Applied, b)) => {
            count(provider, "applied");
            log::info!(
                "{} event {}: {credits} credits granted to customer {}, balance {}",
                provider.name(),
                event.id,
                event.customer,
                b.remaining
            );
            ok("applied")
        }
        Ok(_) => {
            count(provider, "duplicate");
            ok("duplicate")
        }
        Err(why) => {
            log::error!(
                "{} event {} granting {credits} credits to customer {} failed, the provider will retry: {why}",
                provider.name(),
                event.id,
                event.customer
            );
            Reply::problem(
                503,
                "webhook-store-unavailable",
                "Try again later",
                "the credit grant cannot be recorded right now".into(),
            )
        }
    }
}

async fn apply(
    app: &App,
    provider: Provider,
    policy: lifecycle::Policy,
    event: lifecycle::Event,
    now: u64,
) -> Reply {
    let store = app.keys.clone();
    let plans = app.gate.plans.load();
    let ev = event.clone();
    // One locked read-modify-write of the store (a file, or Redis through
    // its blocking adapter), off the workers.
    let result = tokio::task::spawn_blocking(move || {
        // The event reads its customer and the deliveries applied before,
        // nothing else: on Redis, only those are read.
        let only = Only {
            customers: &[ev.customer.as_str()],
            webhook_events: true,
            ..Only::default()
        };
        store.update_only(only, |d| {
            lifecycle::apply(d, provider, &ev, &policy, &|p| plans.get(p).is_some(), now)
                .map_err(|e| StoreError::Invalid(e.0))
        })
    })
    .await;
    let applied = match result {
        Ok(Ok(a)) => a,
        Ok(Err(StoreError::Invalid(why))) => {
            return rejected(
                provider,
                "webhook-body",
                "Webhook event cannot be applied",
                why,
            )
        }
        Ok(Err(e)) => {
            log::error!(
                "{} webhook {} not applied, the provider will retry: {e}",
                provider.name(),
                event.id
            );
            return Reply::problem(
                503,
                "webhook-store-unavailable",
                "Try again later",
                "the plan store cannot be written right now".into(),
            );
        }
        Err(_) => {
            return Reply::problem(
                500,
                "internal",
                "Internal error",
                "see the Tollgate log".into(),
            )
        }
    };
    match applied {
        Applied::Duplicate => {
            count(provider, "duplicate");
            ok("duplicate")
        }
        Applied::Stale => {
            count(provider, "stale");
            log::info!(
                "{} event {} ({}) for customer {} is older than the last one applied: ignored",
                provider.name(),
                event.id,
                event.kind,
                event.customer
            );
            ok("stale")
        }
        Applied::Unmapped => {
            count(provider, "ignored");
            log::warn!(
                "{} event {} ({}) for customer {}: none of its prices ({}) is in billing_webhooks.{}.plans; nothing changed",
                provider.name(),
                event.id,
                event.kind,
                event.customer,
                event.sources.join(", "),
                provider.name()
            );
            ok("ignored")
        }
        Applied::Done {
            old_plan,
            new_plan,
            was_suspended,
            suspended,
            status,
        } => {
            count(provider, "applied");
            // This instance applies the change now (a status change too:
            // /_tollgate/usage reports it); others follow within a second
            // through the store's change path.
            if let Err(e) = app.keys.reload().await {
                log::warn!("webhook: changed the store but could not re-read it yet: {e}");
            }
            if old_plan != new_plan || was_suspended != suspended {
                PLAN_CHANGES.with_label_values(&[provider.name()]).inc();
                let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "(default)".into());
                log::info!(
                    "plan change: customer {} {} -> {}{} (subscription {}; {} event {} {})",
                    event.customer,
                    name(&old_plan),
                    name(&new_plan),
                    match (was_suspended, suspended) {
                        (false, true) => ", suspended",
                        (true, false) => ", suspension lifted",
                        _ => "",
                    },
                    status.as_str(),
                    provider.name(),
                    event.id,
                    event.kind
                );
            }
            ok("applied")
        }
    }
}
