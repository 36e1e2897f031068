//! `index.html`: one self-contained page (inline CSS and script).

use std::fmt::Write as _;

use crate::admin::html;
use crate::config::Config;

use super::{errors, example_path, limits_in_words, plans_in_order};

pub const STYLE: &str = include_str!("docs.css");
pub const SCRIPT: &str = include_str!("docs.js");

/// The four snippets, each runnable as it stands once `YOUR_API_KEY` is
/// replaced: (language, label, code).
pub fn snippets(base: &str, path: &str) -> [(&'static str, &'static str, String); 4] {
    let url = format!("{base}{path}");
    [
        (
            "curl",
            "curl",
            format!("curl -sS -H \"Authorization: Bearer YOUR_API_KEY\" \"{url}\""),
        ),
        (
            "javascript",
            "JavaScript (fetch)",
            format!(
                r#"const res = await fetch("{url}", {{
  headers: {{ Authorization: "Bearer YOUR_API_KEY" }},
}});
if (res.status === 429) {{
  const wait = Number(res.headers.get("Retry-After") || 1);
  console.log(`rate limited: retry in ${{wait}} s`);
}} else {{
  console.log(res.status, await res.text());
}}"#
            ),
        ),
        (
            "python",
            "Python (requests)",
            format!(
                r#"import time
import requests

for attempt in range(5):
    r = requests.get("{url}", headers={{"Authorization": "Bearer YOUR_API_KEY"}}, timeout=10)
    if r.status_code != 429:
        break
    time.sleep(int(r.headers.get("Retry-After", "1")))
print(r.status_code, r.text)"#
            ),
        ),
        (
            "php",
            "PHP (curl)",
            format!(
                r#"<?php
$ch = curl_init("{url}");
curl_setopt($ch, CURLOPT_HTTPHEADER, ["Authorization: Bearer YOUR_API_KEY"]);
curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
$body = curl_exec($ch);
echo curl_getinfo($ch, CURLINFO_HTTP_CODE), " ", $body, "\n";"#
            ),
        ),
    ]
}

pub fn index(config: &Config, base: &str) -> String {
    let d = config.docs.as_ref();
    let title = d
        .and_then(|d| d.title.clone())
        .unwrap_or_else(|| "API documentation".into());
    let path = example_path(config);
    let shown_base = if base.is_empty() {
        "https://api.example.com"
    } else {
        base
    };
    let mut b = String::with_capacity(32 * 1024);
    let _ = write!(
        b,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{t}</title><style>{STYLE}</style></head><body><main>\
         <h1>{t}</h1>",
        t = html(&title)
    );
    if let Some(desc) = d.and_then(|d| d.description.as_deref()) {
        let _ = write!(b, "<p class=\"lead\">{}</p>", html(desc));
    }
    b.push_str("<nav aria-label=\"Contents\"><a href=\"#quick-start\">Quick start</a> <a href=\"#authentication\">Authentication</a> <a href=\"#plans\">Plans</a> <a href=\"#rate-limits\">Rate limits</a> <a href=\"#errors\">Errors</a> <a href=\"#examples\">Examples</a> <a href=\"#try\">Try it</a></nav>");

    // Quick start.
    let curl = &snippets(shown_base, &path)[0].2;
    let _ = write!(
        b,
        "<section id=\"quick-start\"><h2>Quick start</h2><ol><li>Get an API key (it looks like <code>{p}…</code>).</li>\
         <li>Call the API with it:</li></ol><pre><code>{c}</code></pre>\
         <p>Every answer tells you how much of your plan is left (see <a href=\"#rate-limits\">Rate limits</a>). \
         See your usage any time at <code>{s}/_tollgate/usage</code>, or on <a href=\"{s}/_tollgate/\">your dashboard</a>, where you can also upgrade and manage billing.</p></section>",
        p = html(&config.key_prefix),
        c = html(curl),
        s = html(shown_base),
    );

    // Authentication.
    let _ = write!(
        b,
        "<section id=\"authentication\"><h2>Authentication</h2><p>Send your key in one of these headers:</p>\
         <pre><code>Authorization: Bearer {p}…\nX-API-Key: {p}…</code></pre>\
         <p>Keys are secrets: keep them out of URLs, logs and public repositories. A missing, malformed, unknown, revoked or expired key gets <code>401</code>.</p>",
        p = html(&config.key_prefix)
    );
    if let Some(auth) = &config.auth {
        b.push_str("<p>You may also send a JWT from one of these identity providers as <code>Authorization: Bearer &lt;token&gt;</code>:</p><ul>");
        for i in &auth.verifier.issuers {
            let _ = write!(b, "<li><code>{}</code>", html(&i.iss));
            if !i.audience.is_empty() {
                let _ = write!(
                    b,
                    ", audience <code>{}</code>",
                    html(&i.audience.join(", "))
                );
            }
            b.push_str("</li>");
        }
        b.push_str("</ul><p>Its <code>exp</code> is required; an invalid token gets <code>401 invalid-token</code> with the reason.</p>");
    }
    b.push_str("</section>");

    // Plans.
    b.push_str("<section id=\"plans\"><h2>Plans</h2><table><thead><tr><th scope=\"col\">Plan</th><th scope=\"col\">Price</th><th scope=\"col\">Limits</th></tr></thead><tbody>");
    for p in plans_in_order(&config.plans) {
        let shown = p.display.name.clone().unwrap_or_else(|| p.name.to_string());
        let _ = write!(
            b,
            "<tr data-plan=\"{id}\"><th scope=\"row\">{n}<br><code>{id}</code></th><td>{price}</td><td>{lim}{desc}</td></tr>",
            id = html(&p.name),
            n = html(&shown),
            price = html(p.display.price.as_deref().unwrap_or("")),
            lim = html(&limits_in_words(p)),
            desc = p
                .display
                .description
                .as_deref()
                .map(|d| format!("<br><span class=\"muted\">{}</span>", html(d)))
                .unwrap_or_default(),
        );
    }
    let _ = write!(
        b,
        "</tbody></table><p>New keys start on <code>{}</code>. Limits count per account, across all its keys.</p></section>",
        html(&config.plans.default_plan.name)
    );

    // Rate limits.
    b.push_str(
        "<section id=\"rate-limits\"><h2>Rate limits</h2><p>Every answer to a request with a key carries:</p>\
         <pre><code>X-RateLimit-Limit: 5\nX-RateLimit-Remaining: 4\nX-RateLimit-Reset: 1\nRateLimit-Policy: \"burst\";q=5;w=1, \"daily\";q=100;w=86400\nRateLimit: \"burst\";r=4;t=1, \"daily\";r=99;t=50400</code></pre>\
         <p><code>X-RateLimit-*</code> describe the limit closest to running out (<code>Reset</code> in seconds). \
         <code>RateLimit-Policy</code> lists your plan's limits (<code>q</code> requests per <code>w</code> seconds) and <code>RateLimit</code> what is left of each (<code>r</code>) and in how many seconds it comes back (<code>t</code>), as the IETF RateLimit header fields define them.</p>\
         <h3>When you get a 429</h3><p>Wait the number of seconds in <code>Retry-After</code>, then retry; with several clients, add a little random jitter. \
         Do not retry at once in a loop: a refused request consumes nothing, but it does not succeed either. The body says which limits were hit (<code>violated-policies</code>).</p></section>",
    );

    // Errors.
    b.push_str("<section id=\"errors\"><h2>Errors</h2><p>Errors from the gateway are <code>application/problem+json</code> (RFC 9457):</p><table><thead><tr><th scope=\"col\">Status</th><th scope=\"col\">Body</th></tr></thead><tbody>");
    for r in errors(config) {
        let _ = write!(
            b,
            "<tr><td>{}</td><td><pre><code>{}</code></pre></td></tr>",
            r.status(),
            html(&r.body())
        );
    }
    b.push_str("</tbody></table></section>");

    // Examples.
    b.push_str("<section id=\"examples\"><h2>Examples</h2>");
    for (lang, label, code) in snippets(shown_base, &path) {
        let _ = write!(
            b,
            "<h3>{}</h3><pre><code data-snippet=\"{lang}\">{}</code></pre>",
            html(label),
            html(&code)
        );
    }
    b.push_str("</section>");

    // Try it.
    let _ = write!(
        b,
        "<section id=\"try\"><h2>Try it</h2><form id=\"try-form\" data-base=\"{base}\" autocomplete=\"off\">\
         <label for=\"try-key\">API key</label><input id=\"try-key\" type=\"password\" required autocomplete=\"off\" placeholder=\"{p}…\">\
         <label for=\"try-method\">Method</label><select id=\"try-method\"><option>GET</option><option>POST</option><option>PUT</option><option>DELETE</option></select>\
         <label for=\"try-path\">Path</label><input id=\"try-path\" value=\"{path}\" required>\
         <button type=\"submit\">Send</button></form><p class=\"muted\">The request goes from this page to {target} with your key as a header; \
         when the page is not served by the API itself, its origin must be in the gateway's <code>cors.allow_origins</code>.</p>\
         <div id=\"try-result\" aria-live=\"polite\" hidden><p>Status <strong id=\"try-status\"></strong></p><pre><code id=\"try-headers\"></code></pre><pre><code id=\"try-body\"></code></pre></div></section>",
        base = html(base),
        p = html(&config.key_prefix),
        path = html(&path),
        target = if base.is_empty() {
            "this API (the page's own origin)".to_owned()
        } else {
            format!("<code>{}</code>", html(base))
        },
    );
    if let Some(s) = d.and_then(|d| d.support.as_deref()) {
        let _ = write!(b, "<footer><p>Support: {}</p></footer>", html(s));
    }
    let _ = write!(b, "</main><script>{SCRIPT}</script></body></html>");
    b
}
