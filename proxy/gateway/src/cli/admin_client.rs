//! The running proxy's admin API, for the commands that ask it
//! (`usage`, and `billing replay` while the proxy holds the spool).

use std::io::{Read, Write};

use tollgate::config::Config;

/// `method path` with the admin token; the body of a 2xx answer.
pub(super) fn call(
    config: &Config,
    command: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, String> {
    let token = config.admin.token.as_deref().ok_or_else(|| {
        format!(
            "{} is not set: `tollgate {command}` asks the running proxy's admin API with that token",
            config.admin.token_env
        )
    })?;
    let addr = config.admin.listen;
    let fail = |e: std::io::Error| {
        format!("cannot reach the admin API at {addr} (is `tollgate run` up?): {e}")
    };
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map_err(fail)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .map_err(fail)?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(fail)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(fail)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed answer from the admin API")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if !status.starts_with('2') {
        let detail = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.to_owned());
        return Err(format!("admin API answered {status}: {detail}"));
    }
    Ok(body.to_owned())
}
