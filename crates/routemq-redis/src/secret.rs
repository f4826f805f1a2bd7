//! A string that must never reach a log line or `Debug` output (spec §8), and
//! [`redact_url`] for the messages that must name a URL which may carry one.

use std::fmt;

/// A password or other secret. `Debug` and `Display` print `"<redacted>"`; the value is only
/// reachable through [`Secret::expose`], so every place that uses it is easy to find.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `url` fit for a message: whatever precedes its last `@` (the userinfo, where a password
/// goes) is replaced by `<redacted>`, the scheme kept. The last `@`, not the first: an
/// unencoded `@` in a password would otherwise leave its tail in view. Without a `scheme://`
/// in front, everything before the `@` goes, since the parts cannot be told apart.
pub fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_string();
    };
    let (before, after) = url.split_at(at);
    let scheme = before
        .split_once("://")
        .map(|(scheme, _)| scheme)
        .filter(|scheme| is_scheme(scheme));
    match scheme {
        Some(scheme) => format!("{scheme}://<redacted>{after}"),
        None => format!("<redacted>{after}"),
    }
}

/// A URL scheme per RFC 3986: a letter, then letters, digits, `+`, `-` or `.`. What is not
/// one may be anything, a password included, and is not quoted.
pub fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_the_userinfo_and_keeps_the_rest() {
        for (url, shown) in [
            ("mqtt://u:pw@h:notaport", "mqtt://<redacted>@h:notaport"),
            ("redis://:pw@h:6379/0", "redis://<redacted>@h:6379/0"),
            ("mqtt://u:p@ss@h", "mqtt://<redacted>@h"),
            ("mqtt://u:pw/x@h", "mqtt://<redacted>@h"),
            ("u:pw@h:1883", "<redacted>@h:1883"),
            ("redis:pw@h://x", "<redacted>@h://x"),
            ("mqtt://h:1883", "mqtt://h:1883"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn secrets_print_redacted() {
        let s = Secret::new("pw");
        assert_eq!(format!("{s:?} {s}"), "\"<redacted>\" <redacted>");
    }
}
