//! Configuration diagnostics: every problem found in a file, each with
//! file, line, column and a hint, so `tollgate check` can list them all.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// All problems found while loading; loading fails if there is any.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
}

/// A YAML source with an index from value paths (`plans.free.limits[1].per`)
/// to where they stand, so errors found after deserialising can be located.
#[derive(Debug)]
pub struct Source {
    pub file: PathBuf,
    pub text: String,
    positions: HashMap<String, (usize, usize)>,
    /// Where each mapping key itself stands (for "unknown field" errors).
    key_positions: HashMap<String, (usize, usize)>,
}

impl Source {
    pub fn new(file: &Path, text: String) -> Self {
        let mut index = Indexer::default();
        let mut parser = Parser::new_from_str(&text);
        // A syntax error leaves a partial index; serde_yaml reports the error itself.
        let _ = parser.load(&mut index, false);
        Self {
            file: file.to_path_buf(),
            text,
            positions: index.positions,
            key_positions: index.key_positions,
        }
    }

    /// Where `path` stands, or its nearest located ancestor, or the file start.
    pub fn locate(&self, path: &str) -> (usize, usize) {
        if path.is_empty() {
            return (1, 1);
        }
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return (1, 1),
            }
        }
    }

    /// A diagnostic at the place `path` stands.
    pub fn error(&self, path: &str, message: impl Into<String>, hint: Option<&str>) -> Diagnostic {
        let (line, column) = self.locate(path);
        Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
            hint: hint.map(str::to_owned),
        }
    }

    /// An unknown top-level setting, at its key.
    pub fn unknown_key(&self, key: &str, known: &str) -> Diagnostic {
        let (line, column) = self.key_positions.get(key).copied().unwrap_or((1, 1));
        Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: format!("unknown field `{key}`"),
            hint: Some(format!("known settings: {known}")),
        }
    }

    /// Deserialises one item found at `path` on its own, so a broken item is
    /// reported at its own line and the other items are still checked.
    pub fn typed<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        value: &serde_yaml::Value,
        diags: &mut Diagnostics,
    ) -> Option<T> {
        // Round-tripping through text makes serde_yaml name the failing field.
        let text = match serde_yaml::to_string(value) {
            Ok(t) => t,
            Err(e) => {
                diags.0.push(self.error(path, e.to_string(), None));
                return None;
            }
        };
        match serde_yaml::from_str::<T>(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                diags.0.push(self.serde_error(path, &e));
                None
            }
        }
    }

    /// Locates a serde_yaml error whose message starts with a path relative to `base`.
    pub fn serde_error(&self, base: &str, e: &serde_yaml::Error) -> Diagnostic {
        let msg = e.to_string();
        let msg = match msg.rfind(" at line ") {
            Some(i) => &msg[..i],
            None => &msg[..],
        };
        let (rel, text) = match msg.split_once(": ") {
            Some((p, rest)) if !p.contains(' ') => (p, rest),
            _ => ("", msg),
        };
        let mut path = base.to_owned();
        if !rel.is_empty() && rel != "." {
            if !path.is_empty() && !rel.starts_with('[') {
                path.push('.');
            }
            path.push_str(rel);
        }
        // An unknown field is reported at the field itself.
        if let Some(field) = text
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            let candidate = if path.is_empty() {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            if let Some(&(line, column)) = self.key_positions.get(&candidate) {
                return Diagnostic {
                    file: self.file.clone(),
                    line,
                    column,
                    message: text.to_owned(),
                    hint: Some(
                        "remove it or check its spelling against the config reference".into(),
                    ),
                };
            }
        }
        self.error(&path, text, None)
    }

    /// An error from deserialising the whole file: a type or field error is
    /// located by its path, anything else (bad YAML) by serde_yaml's mark.
    pub fn syntax_error(&self, e: &serde_yaml::Error) -> Diagnostic {
        let msg = e.to_string();
        let typed = msg
            .split_once(": ")
            .is_some_and(|(p, _)| !p.contains(' ') && !p.is_empty());
        match e.location() {
            Some(loc) if !typed => {
                let text = msg.rfind(" at line ").map_or(&msg[..], |i| &msg[..i]);
                Diagnostic {
                    file: self.file.clone(),
                    line: loc.line(),
                    column: loc.column(),
                    message: text.to_owned(),
                    hint: Some("the file is not valid YAML, or a value has the wrong type".into()),
                }
            }
            _ => self.serde_error("", e),
        }
    }
}

/// Where environment variables come from (the process, or a test's map).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

const DURATION_HINT: &str = "write a number and a unit: ms, s, m, h or d (e.g. 30s)";

/// Validation of one config file in progress: the problems found so far,
/// and the helpers every section (the gateway's, each sink's) checks its
/// values with, so they all word and locate errors alike.
pub struct Check<'a> {
    pub src: &'a Source,
    /// Relative paths resolve against this: the config file's folder.
    pub dir: PathBuf,
    pub env: Env<'a>,
    /// Secrets are not needed now (key and customer commands): an unset
    /// secret is no error, and its value is empty.
    pub defer_secrets: bool,
    pub d: Diagnostics,
}

impl<'a> Check<'a> {
    pub fn new(src: &'a Source, env: Env<'a>) -> Self {
        let dir = src
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self {
            src,
            dir,
            env,
            defer_secrets: false,
            d: Diagnostics::default(),
        }
    }

    pub fn err(&mut self, path: &str, msg: impl Into<String>, hint: Option<&str>) {
        self.d.0.push(self.src.error(path, msg, hint));
    }

    /// Deserialises the item at `path` on its own (see [`Source::typed`]).
    pub fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        value: &serde_yaml::Value,
    ) -> Option<T> {
        self.src.typed(path, value, &mut self.d)
    }

    /// `p` relative to the config file.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// A socket address like `0.0.0.0:8080`.
    pub fn addr(&mut self, path: &str, value: &str) -> Option<std::net::SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("`{value}` is not an address like 0.0.0.0:8080"),
                    Some("give an IP and a port; use 0.0.0.0 for all interfaces"),
                );
                None
            }
        }
    }

    /// A non-zero duration, or `default` when unset (an error when invalid).
    pub fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match crate::clock::parse_duration(v).filter(|d| !d.is_zero()) {
                Some(d) => d,
                None => {
                    self.err(
                        path,
                        format!("`{v}` is not a duration"),
                        Some(DURATION_HINT),
                    );
                    default
                }
            },
        }
    }

    /// The value of the env var a `*_env` setting names; unset or empty is
    /// an error at `path` (secrets come only from the environment).
    pub fn secret(&mut self, path: &str, var: &str) -> Option<String> {
        let v = (self.env)(var).filter(|v| !v.is_empty());
        if v.is_none() && self.defer_secrets {
            return Some(String::new());
        }
        if v.is_none() {
            self.err(
                path,
                format!("environment variable {var} is not set"),
                Some("secrets come only from the environment"),
            );
        }
        v
    }

    /// An `http://` or `https://` URL.
    pub fn http_url(&mut self, path: &str, u: &str) {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            self.err(path, format!("`{u}` is not an http(s) URL"), None);
        }
    }

    /// No problem found since `mark` (a count of `self.d`).
    pub fn clean_since(&self, mark: usize) -> bool {
        self.d.0.len() == mark
    }
}

#[derive(Default)]
struct Indexer {
    positions: HashMap<String, (usize, usize)>,
    key_positions: HashMap<String, (usize, usize)>,
    stack: Vec<Frame>,
}

enum Frame {
    /// A mapping; `key` is Some while its value is awaited.
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl Indexer {
    /// The path of the node starting now, advancing the parent's state.
    fn child_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
        }
    }
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    if key.is_none() {
                        let p = join(path, &value);
                        self.positions.insert(p.clone(), pos);
                        self.key_positions.insert(p, pos);
                        *key = Some(value);
                        return;
                    }
                }
                if let Some(p) = self.child_path() {
                    // Values point at the value itself, more precise than the key.
                    self.positions.insert(p, pos);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.child_path().unwrap_or_default();
                self.positions.entry(path.clone()).or_insert(pos);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.child_path();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_locates_nested_values() {
        let src = "a: 1\nplans:\n  free:\n    limits:\n      - { name: burst, per: second }\n      - name: daily\n        per: dey\n";
        let s = Source::new(Path::new("p.yaml"), src.into());
        assert_eq!(s.locate("a"), (1, 4));
        assert_eq!(s.locate("plans.free.limits[0].per"), (5, 29));
        assert_eq!(s.locate("plans.free.limits[1].per"), (7, 14));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            s.locate("plans.free.limits[1].nope"),
            s.locate("plans.free.limits[1]")
        );
        assert_eq!(s.locate("zzz"), (1, 1));
    }
}
