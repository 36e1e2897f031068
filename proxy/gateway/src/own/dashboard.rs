//! `GET /_tollgate/`: the consumer dashboard. One self-contained page (its
//! CSS and script inline, no external asset, no build step) rendered once
//! from the config: the consumer pastes a key and the page calls
//! `/_tollgate/usage`, `/_tollgate/billing/checkout` and
//! `/_tollgate/billing/portal` with it as a header. Its
//! `Content-Security-Policy` allows exactly its own inline style and script
//! (by hash) and requests to this origin.

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderName};
use sha2::{Digest, Sha256};

use super::Reply;
use crate::admin::html;
use crate::config::Config;

const PAGE: &str = include_str!("dashboard.html");
const STYLE: &str = include_str!("dashboard.css");
const SCRIPT: &str = include_str!("dashboard.js");

/// The page and its policy, built once at start.
pub struct Dashboard {
    body: Bytes,
    csp: String,
}

fn hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// A policy that allows a page exactly its own inline script and style
/// (by hash) and requests to its own origin.
fn policy(script: &str, style: &str) -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(script),
        hash(style)
    )
}

impl Dashboard {
    pub fn new(config: &Config) -> Self {
        // One button per plan with a checkout price, and one for a credit
        // pack when one is on sale; none without checkout.
        let (upgrades, portal) = match &config.checkout {
            Some(c) => {
                let mut buttons: String = c
                    .prices
                    .keys()
                    .map(|p| {
                        format!(
                            "<button type=\"button\" data-plan=\"{0}\">Upgrade to {0}</button>",
                            html(p)
                        )
                    })
                    .collect();
                if let Some(pack) = &c.credit_pack {
                    buttons.push_str(&format!(
                        "<button type=\"button\" data-credits=\"{0}\" hidden>Buy {0} credits</button>",
                        pack.credits
                    ));
                }
                (buttons, true)
            }
            None => (String::new(), false),
        };
        let mut page = PAGE
            .replace("/*STYLE*/", STYLE)
            .replace("/*SCRIPT*/", SCRIPT)
            .replace("<!--UPGRADES-->", &upgrades);
        if !portal {
            for part in [
                "<button type=\"button\" id=\"portal\" class=\"secondary\">Manage billing</button>",
                "<p id=\"change-note\" class=\"help\" hidden>To change your plan, use \"Manage billing\".</p>",
            ] {
                page = page.replace(part, "");
            }
        }
        Self {
            body: Bytes::from(page),
            csp: policy(SCRIPT, STYLE),
        }
    }
}

/// The consumer docs page (`docs.serve: true`), rendered once for this
/// origin, with the same kind of policy as the dashboard.
pub fn docs_page(config: &Config) -> Option<Dashboard> {
    if !config.docs.as_ref().is_some_and(|d| d.serve) {
        return None;
    }
    let body = crate::docs::render(config, "", None).ok()?.index;
    Some(Dashboard {
        body: Bytes::from(body),
        csp: policy(crate::docs::SCRIPT, crate::docs::STYLE),
    })
}

pub fn page(app: &crate::app::App) -> Reply {
    serve(&app.dashboard.load())
}

/// A page of ours with its policy and the headers that go with it.
pub fn serve(d: &Dashboard) -> Reply {
    Reply {
        status: 200,
        content_type: "text/html; charset=utf-8",
        headers: vec![
            (header::CONTENT_SECURITY_POLICY, d.csp.clone()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".into()),
            (header::X_FRAME_OPTIONS, "DENY".into()),
            (header::REFERRER_POLICY, "no-referrer".into()),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                "same-origin".into(),
            ),
        ],
        body: d.body.clone(),
        outcome: "allowed",
    }
}
