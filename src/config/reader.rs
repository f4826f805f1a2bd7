//! A typed reader over merged figment values that reports every error, not just the first.
//!
//! serde stops at the first type error, but `check` must list all of them (spec §2), each
//! with the file or variable it came from and its key path. [`Table`] reads one TOML table:
//! every getter records what went wrong in the shared [`Errors`] and returns `None` (or the
//! default), so reading carries on; [`Table::finish`] then reports the keys nobody asked
//! for. Route and republish rules are kept as [`RawTable`]s and read later with the same
//! reader, so their errors look the same.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::value::{Dict, Tag, Value};
use figment::{Figment, Profile, Source};

use super::error::{ConfigError, ConfigErrors, ConfigWarning};
use super::layers::{FILE_LAYER, PREFIX_LAYER, SEED_LAYER};
use super::Secret;

// The conversions once lived here; their paths stay so a component reads `reader::…` alone.
pub use super::value::{found, FromValue, Size, MAX_DURATION};

/// The errors of one load, shared by every [`Table`] read from it, and its warnings.
#[derive(Debug, Default)]
pub struct Errors {
    errors: RefCell<Vec<ConfigError>>,
    warnings: RefCell<Vec<ConfigWarning>>,
}

impl Errors {
    pub fn new() -> Self {
        Errors::default()
    }

    pub fn push(&self, error: ConfigError) {
        self.errors.borrow_mut().push(error);
    }

    pub fn len(&self) -> usize {
        self.errors.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.borrow().is_empty()
    }

    /// Records a warning: the load still succeeds.
    pub fn warn(&self, warning: ConfigWarning) {
        self.warnings.borrow_mut().push(warning);
    }

    /// The warnings recorded so far, leaving none behind.
    pub fn take_warnings(&self) -> Vec<ConfigWarning> {
        std::mem::take(&mut *self.warnings.borrow_mut())
    }

    /// `Ok(value)` when nothing was recorded, else every recorded error.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        let errors = self.errors.into_inner();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors::new(errors))
        }
    }
}

/// Where values came from (the merged figment, whose tags name each value's provider), and
/// what relative paths are relative to.
pub struct Context {
    figment: Figment,
    base_dir: PathBuf,
    credentials_dir: Option<PathBuf>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("base_dir", &self.base_dir)
            .field("credentials_dir", &self.credentials_dir)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// `base_dir` resolves relative paths (the config file's directory);
    /// `credentials_dir` is systemd's `$CREDENTIALS_DIRECTORY`.
    pub(crate) fn new(
        figment: Figment,
        base_dir: PathBuf,
        credentials_dir: Option<PathBuf>,
    ) -> Self {
        Context {
            figment,
            base_dir,
            credentials_dir,
        }
    }

    /// The whole merged configuration as a table to read.
    pub(crate) fn root(self: Arc<Self>) -> RawTable {
        let (tag, dict) = match self.figment.find_value("") {
            Ok(Value::Dict(tag, dict)) => (tag, dict),
            // Every provider yields a dict, so anything else means "nothing configured".
            _ => (Tag::Default, Dict::new()),
        };
        RawTable {
            path: String::new(),
            tag,
            dict,
            cx: self,
        }
    }

    /// Who set the value tagged `tag` at `path`: the file's path, `environment variable
    /// REDIS_PORT`, or `built-in default`.
    pub fn source(&self, tag: Tag, path: &str) -> String {
        let Some(md) = self.figment.get_metadata(tag) else {
            return "built-in default".to_string();
        };
        if let Some(Source::File(p)) = &md.source {
            return p.display().to_string();
        }
        if md.name == SEED_LAYER || md.name == PREFIX_LAYER {
            let keys: Vec<&str> = path.split('.').collect();
            return format!(
                "environment variable {}",
                md.interpolate(&Profile::Default, &keys)
            );
        }
        md.name.to_string()
    }

    /// Precedence of the layer that set the value tagged `tag`: higher wins.
    pub(crate) fn rank(&self, tag: Tag) -> u8 {
        match self.figment.get_metadata(tag).map(|md| md.name.as_ref()) {
            Some(FILE_LAYER) => 1,
            Some(SEED_LAYER) => 2,
            Some(PREFIX_LAYER) => 3,
            _ => 0,
        }
    }

    /// `path` as the operator meant it: absolute as is, relative to the config file.
    pub fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }
}

/// A table kept for later reading (a route or republish rule), with its key path.
#[derive(Clone)]
pub struct RawTable {
    path: String,
    tag: Tag,
    dict: Dict,
    cx: Arc<Context>,
}

impl fmt::Debug for RawTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawTable")
            .field("path", &self.path)
            .field("dict", &self.dict)
            .finish()
    }
}

impl RawTable {
    /// The key path of this table, e.g. `routes[3]`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn reader<'a>(&'a self, errors: &'a Errors) -> Table<'a> {
        Table {
            cx: &self.cx,
            errors,
            path: self.path.clone(),
            tag: self.tag,
            dict: &self.dict,
            known: Vec::new(),
        }
    }
}

static EMPTY: Dict = Dict::new();

/// One table being read. Every getter marks its key as known, records any error, and keeps
/// going; call [`Table::finish`] when done so unknown keys are reported.
#[must_use = "call finish() so unknown keys are reported"]
pub struct Table<'a> {
    cx: &'a Arc<Context>,
    errors: &'a Errors,
    path: String,
    tag: Tag,
    dict: &'a Dict,
    known: Vec<String>,
}

impl<'a> Table<'a> {
    /// This table's key path (`""` at the top, `redis`, `routes[3]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The key path of `key` in this table.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The keys of this table, in file order (does not mark them known).
    pub fn keys(&self) -> Vec<String> {
        self.dict.keys().cloned().collect()
    }

    /// Whether `key` is set (does not mark it known).
    pub fn has(&self, key: &str) -> bool {
        self.lookup(key).is_some()
    }

    /// Marks `key` as known without reading it.
    pub fn ignore(&mut self, key: &str) {
        self.mark(key);
    }

    /// The raw value of `key`, marking it known.
    pub fn value(&mut self, key: &str) -> Option<&'a Value> {
        self.mark(key);
        self.lookup(key)
    }

    /// Who set `key` (or this table, when `key` is absent).
    pub fn source_of(&self, key: &str) -> String {
        match self.lookup(key) {
            Some(v) => self.cx.source(v.tag(), &self.key_path(key)),
            None => self.cx.source(self.tag, &self.path),
        }
    }

    /// Records an error about `key`, blamed on whoever set it.
    pub fn error(&self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(
            self.source_of(key),
            self.key_path(key),
            message,
        ));
    }

    /// Records a warning about `key` (a valid setting that is likely a mistake), blamed on
    /// whoever set it.
    pub fn warn(&self, key: &str, message: impl Into<String>) {
        self.errors.warn(ConfigWarning::new(
            self.source_of(key),
            self.key_path(key),
            message,
        ));
    }

    /// Records an error about a value nested below this table (`["mqtt",
    /// "max_packet_size"]`), for checks that span sections.
    pub fn error_at(&self, keys: &[&str], message: impl Into<String>) {
        let mut path = self.path.clone();
        let mut tag = self.tag;
        let mut dict = Some(self.dict);
        for key in keys {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(key);
            match dict.and_then(|d| d.get(*key)) {
                Some(v) => {
                    tag = v.tag();
                    dict = v.as_dict();
                }
                None => dict = None,
            }
        }
        self.errors
            .push(ConfigError::new(self.cx.source(tag, &path), path, message));
    }

    /// `key` converted to `T`; `None` when absent or wrong (the error is recorded).
    pub fn get<T: FromValue>(&mut self, key: &str) -> Option<T> {
        let value = self.value(key)?;
        match T::from_value(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// `key` converted to `T`, then checked or transformed by `check`, whose `Err` message
    /// is recorded.
    pub fn parse<T: FromValue, U>(
        &mut self,
        key: &str,
        check: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        let value = self.get::<T>(key)?;
        match check(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    pub fn string(&mut self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or_else(|| default.to_string())
    }

    pub fn opt_string(&mut self, key: &str) -> Option<String> {
        self.get(key)
    }

    /// A string that must not be empty.
    pub fn non_empty_string(&mut self, key: &str, default: &str) -> String {
        self.parse(key, |s: String| {
            if s.trim().is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(s)
            }
        })
        .unwrap_or_else(|| default.to_string())
    }

    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        self.get(key).unwrap_or(default)
    }

    pub fn u16(&mut self, key: &str, default: u16) -> u16 {
        self.get(key).unwrap_or(default)
    }

    pub fn u64(&mut self, key: &str, default: u64) -> u64 {
        self.get(key).unwrap_or(default)
    }

    pub fn usize(&mut self, key: &str, default: usize) -> usize {
        self.get(key).unwrap_or(default)
    }

    pub fn f64(&mut self, key: &str, default: f64) -> f64 {
        self.get(key).unwrap_or(default)
    }

    /// A count that must be at least `min`.
    pub fn at_least<T>(&mut self, key: &str, min: T, default: T) -> T
    where
        T: FromValue + PartialOrd + fmt::Display + Copy,
    {
        self.parse(key, |n: T| {
            if n >= min {
                Ok(n)
            } else {
                Err(format!("must be at least {min}, found {n}"))
            }
        })
        .unwrap_or(default)
    }

    /// A TCP port, 1..=65535.
    pub fn port(&mut self, key: &str, default: u16) -> u16 {
        self.parse(key, |n: i128| match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("expected a port number 1..=65535, found {n}")),
        })
        .unwrap_or(default)
    }

    /// A duration: `"250ms"`, `"30s"`, `"1h 30m"`, or a number of seconds.
    /// An MQTT QoS: 0, 1 or 2.
    pub fn qos(&mut self, key: &str, default: u8) -> u8 {
        self.parse::<u64, _>(key, |q| {
            u8::try_from(q)
                .ok()
                .filter(|q| *q <= 2)
                .ok_or_else(|| format!("expected 0, 1 or 2, found {q}"))
        })
        .unwrap_or(default)
    }

    /// One of the named `options` (e.g. `strategy = "sliding_window"`).
    pub fn choice<T: Copy>(&mut self, key: &str, options: &[(&str, T)], default: T) -> T {
        self.parse::<String, _>(key, |s| {
            options
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(n, _)| format!("{n:?}")).collect();
                    format!("expected one of {}, found {s:?}", names.join(", "))
                })
        })
        .unwrap_or(default)
    }

    pub fn duration(&mut self, key: &str, default: Duration) -> Duration {
        self.get(key).unwrap_or(default)
    }

    pub fn opt_duration(&mut self, key: &str) -> Option<Duration> {
        self.get(key)
    }

    /// A duration that must not be zero.
    pub fn positive_duration(&mut self, key: &str, default: Duration) -> Duration {
        self.parse(key, |d: Duration| {
            if d.is_zero() {
                Err("must be longer than zero".to_string())
            } else {
                Ok(d)
            }
        })
        .unwrap_or(default)
    }

    /// A size in bytes: `"256KiB"`, `"1MiB"`, `"1MB"`, or a number of bytes.
    pub fn size(&mut self, key: &str, default: u64) -> u64 {
        self.get::<Size>(key).map_or(default, |b| b.0)
    }

    /// A list of strings: a TOML array, or a comma-separated string (from the environment).
    pub fn string_list(&mut self, key: &str) -> Vec<String> {
        self.get(key).unwrap_or_default()
    }

    /// A path, relative ones resolved against the config file's directory.
    pub fn path_buf(&mut self, key: &str) -> Option<PathBuf> {
        self.parse(key, |s: String| {
            if s.is_empty() {
                Err("must not be empty".to_string())
            } else {
                Ok(s)
            }
        })
        .map(|s| self.cx.resolve(&s))
    }

    /// The password of this table from `password` or `password_file`, else from the systemd
    /// credential `credential` (e.g. `redis_password`) when `$CREDENTIALS_DIRECTORY` holds
    /// one. Both keys in one layer is an error; across layers the higher one wins, like
    /// every other key. An empty `password` counts as none.
    pub fn password(&mut self, credential: &str) -> Option<Secret> {
        let password = self
            .get::<Secret>("password")
            .filter(|s| !s.expose().is_empty());
        let file = self
            .get::<String>("password_file")
            .filter(|s| !s.is_empty());
        match (password, file) {
            (Some(p), Some(f)) => {
                let rank = |key: &str| self.lookup(key).map_or(0, |v| self.cx.rank(v.tag()));
                let (by_value, by_file) = (rank("password"), rank("password_file"));
                if by_value == by_file {
                    self.error(
                        "password_file",
                        format!(
                            "set either password or password_file, not both (password is \
                             also set by {})",
                            self.source_of("password")
                        ),
                    );
                    None
                } else if by_value > by_file {
                    Some(p)
                } else {
                    self.secret_file("password_file", &f)
                }
            }
            (Some(p), None) => Some(p),
            (None, Some(f)) => self.secret_file("password_file", &f),
            (None, None) => {
                let path = self.cx.credentials_dir.as_ref()?.join(credential);
                if !path.is_file() {
                    return None;
                }
                match read_secret(&path) {
                    Ok(s) => Some(s),
                    Err(message) => {
                        self.errors.push(ConfigError::new(
                            path.display().to_string(),
                            self.key_path("password"),
                            message,
                        ));
                        None
                    }
                }
            }
        }
    }

    /// Reads the secret file `file` named by `key`: relative paths live in
    /// `$CREDENTIALS_DIRECTORY` when set (systemd `LoadCredential=`), else beside the config.
    fn secret_file(&mut self, key: &str, file: &str) -> Option<Secret> {
        let path = match &self.cx.credentials_dir {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => self.cx.resolve(file),
        };
        match read_secret(&path) {
            Ok(s) => Some(s),
            Err(message) => {
                self.error(key, message);
                None
            }
        }
    }

    /// The sub-table `key`; `None` when absent (or not a table: the error is recorded).
    pub fn opt_table(&mut self, key: &str) -> Option<Table<'a>> {
        let value = self.value(key)?;
        match value {
            Value::Dict(tag, dict) => Some(self.child(self.key_path(key), *tag, dict)),
            other => {
                self.error(key, format!("expected a table, found {}", found(other)));
                None
            }
        }
    }

    /// The sub-table `key`, empty when absent, so its defaults apply.
    pub fn table(&mut self, key: &str) -> Table<'a> {
        match self.opt_table(key) {
            Some(t) => t,
            None => self.child(self.key_path(key), Tag::Default, &EMPTY),
        }
    }

    /// An array of tables (`[[key]]`), each with its index path (`key[3]`).
    pub fn tables(&mut self, key: &str) -> Vec<Table<'a>> {
        self.array_of_tables(key)
            .into_iter()
            .map(|(path, tag, dict)| self.child(path, tag, dict))
            .collect()
    }

    /// Like [`Table::tables`], but kept for reading later (routes, republish rules).
    pub fn raw_tables(&mut self, key: &str) -> Vec<RawTable> {
        self.array_of_tables(key)
            .into_iter()
            .map(|(path, tag, dict)| RawTable {
                path,
                tag,
                dict: dict.clone(),
                cx: self.cx.clone(),
            })
            .collect()
    }

    /// Reports every key of this table that no getter asked for.
    pub fn finish(self) {
        for (key, value) in self.dict {
            if self.known.iter().any(|k| k == key) {
                continue;
            }
            let mut message = "unknown key".to_string();
            if let Some(near) = closest(key, &self.known) {
                message.push_str(&format!(" (did you mean `{near}`?)"));
            }
            let path = self.key_path(key);
            self.errors.push(ConfigError::new(
                self.cx.source(value.tag(), &path),
                path,
                message,
            ));
        }
    }

    fn array_of_tables(&mut self, key: &str) -> Vec<(String, Tag, &'a Dict)> {
        let Some(value) = self.value(key) else {
            return Vec::new();
        };
        let Value::Array(_, items) = value else {
            self.error(
                key,
                format!(
                    "expected an array of tables ([[{key}]]), found {}",
                    found(value)
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{i}]", self.key_path(key));
            match item {
                Value::Dict(tag, dict) => out.push((path, *tag, dict)),
                other => self.errors.push(ConfigError::new(
                    self.cx.source(other.tag(), &path),
                    path,
                    format!("expected a table, found {}", found(other)),
                )),
            }
        }
        out
    }

    fn child(&self, path: String, tag: Tag, dict: &'a Dict) -> Table<'a> {
        Table {
            cx: self.cx,
            errors: self.errors,
            path,
            tag,
            dict,
            known: Vec::new(),
        }
    }

    fn mark(&mut self, key: &str) {
        if !self.known.iter().any(|k| k == key) {
            self.known.push(key.to_string());
        }
    }

    fn lookup(&self, key: &str) -> Option<&'a Value> {
        match self.dict.get(key) {
            Some(Value::Empty(..)) | None => None,
            Some(v) => Some(v),
        }
    }
}

/// A secret file's content, trailing newlines trimmed (editors and `echo` add one).
fn read_secret(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(secret))
}

/// The known key closest to `key`, if it is a plausible typo of it.
fn closest<'k>(key: &str, known: &'k [String]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}
