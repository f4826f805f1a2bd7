//! Configuration errors: every problem found in one load, each naming where it came from.
//!
//! `check` and a refused reload must show the operator *all* mistakes at once, so the loader
//! collects [`ConfigError`]s instead of stopping at the first; [`ConfigErrors`] prints them
//! one per line as `<source>: <key path>: <message>`.
//!
//! A [`ConfigWarning`] has the same shape: a valid setting that probably does not do what
//! the operator meant (it is printed by `check` and logged at start-up, never refused).

use std::fmt;

/// One problem in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending value came from: the config file's path, or
    /// `environment variable REDIS_PORT`.
    pub source: String,
    /// The key path, e.g. `redis.port` or `routes[3].actions[0].key`; empty for problems
    /// with the file as a whole (unreadable, TOML syntax).
    pub path: String,
    /// What is wrong, and what was found.
    pub message: String,
}

impl ConfigError {
    pub fn new(
        source: impl Into<String>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            source: source.into(),
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source, self.path, self.message)
        }
    }
}

/// A setting that loads but is likely a mistake: where it came from, its key path, and why.
pub type ConfigWarning = ConfigError;

/// Every error found while loading; never empty when returned as an `Err`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    pub fn new(errors: Vec<ConfigError>) -> Self {
        ConfigErrors(errors)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<ConfigError> {
        self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
