//! `tollgate docs --out DIR [--base-url URL] [--openapi FILE]`.

use std::path::Path;
use std::process::ExitCode;

use tollgate::config::Config;

pub(super) fn write(
    config: &Config,
    out: &Path,
    base_url: Option<&str>,
    openapi: Option<&Path>,
) -> Result<ExitCode, String> {
    let base = match base_url {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => u.to_owned(),
        Some(u) => return Err(format!("--base-url `{u}` is not an http(s) URL")),
        None => {
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", config.listen)
        }
    };
    let upstream = openapi
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            // JSON is YAML too.
            serde_yaml::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("{}: not an OpenAPI document: {e}", p.display()))
        })
        .transpose()?;
    let site = tollgate::docs::render(config, &base, upstream.as_ref()).map_err(|e| {
        format!(
            "{}: {e}",
            openapi.map_or_else(String::new, |p| p.display().to_string())
        )
    })?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let put = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok::<(), String>(())
    };
    put("index.html", &site.index)?;
    put("postman_collection.json", &site.postman)?;
    if let Some(doc) = &site.openapi {
        put("openapi.json", doc)?;
    }
    Ok(ExitCode::SUCCESS)
}
