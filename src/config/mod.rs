//! Loading and validating the configuration (spec §4): one loader for the whole daemon.

mod secret;

pub use secret::Secret;
