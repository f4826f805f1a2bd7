//! Channel patterns of pub/sub republish rules (spec §7): `commands:{device_id}`.
//!
//! Redis channels are flat strings, conventionally `:`-separated, so a `{name}` here
//! captures a non-empty run without `:` (where a topic pattern captures a `/` level). A
//! pattern without captures is a literal channel (SUBSCRIBE); with captures it becomes a
//! glob for PSUBSCRIBE (`commands:*`, glob characters of the literal parts escaped), and each
//! message's channel is matched again here, because `*` also matches `:`.

use std::fmt;

use crate::router::pattern::{is_identifier, RESERVED_NAMES};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Param(String),
}

/// A compiled channel pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelPattern {
    raw: String,
    parts: Vec<Part>,
}

impl ChannelPattern {
    /// Parses `raw`; the error says what is wrong, for the config loader.
    pub fn parse(raw: &str) -> Result<ChannelPattern, String> {
        if raw.is_empty() {
            return Err("the channel is empty".into());
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = raw;
        while let Some(c) = rest.chars().next() {
            match c {
                '{' if rest.starts_with("{{") => {
                    literal.push('{');
                    rest = &rest[2..];
                }
                '}' if rest.starts_with("}}") => {
                    literal.push('}');
                    rest = &rest[2..];
                }
                '}' => return Err("unmatched `}`; write `}}` for a literal brace".into()),
                '{' => {
                    let Some(end) = rest.find('}') else {
                        return Err("unclosed `{`; write `{{` for a literal brace".into());
                    };
                    let name = &rest[1..end];
                    if !is_identifier(name) {
                        return Err(format!(
                            "`{{{name}}}`: a param name is letters, digits and `_`, not starting with a digit"
                        ));
                    }
                    if RESERVED_NAMES.contains(&name) {
                        return Err(format!(
                            "`{{{name}}}` is a reserved template name; rename the param"
                        ));
                    }
                    if parts
                        .iter()
                        .any(|p| matches!(p, Part::Param(n) if n == name))
                    {
                        return Err(format!("param `{name}` is captured twice"));
                    }
                    if literal.is_empty() && matches!(parts.last(), Some(Part::Param(_))) {
                        return Err(format!(
                            "`{{{name}}}` follows another capture directly; separate them (e.g. with `:`)"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Param(name.to_string()));
                    rest = &rest[end + 1..];
                }
                c => {
                    literal.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(ChannelPattern {
            raw: raw.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The names this pattern captures, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The channel to SUBSCRIBE when nothing is captured.
    pub fn literal(&self) -> Option<String> {
        match self.parts.as_slice() {
            [] => Some(String::new()),
            [Part::Literal(l)] => Some(l.clone()),
            _ => None,
        }
    }

    /// The glob to PSUBSCRIBE: each capture becomes `*`, glob characters are escaped.
    pub fn glob(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Param(_) => out.push('*'),
                Part::Literal(l) => {
                    for c in l.chars() {
                        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// Matches a channel; on success, the captured values in pattern order.
    pub fn matches<'c>(&self, channel: &'c str) -> Option<Vec<&'c str>> {
        let mut captures = Vec::new();
        match_parts(&self.parts, channel, &mut captures).then_some(captures)
    }
}

/// Backtracking match: a capture may end at any `:`-free position, the first that lets the
/// rest match wins (patterns are short, and captures are separated by literals).
fn match_parts<'c>(parts: &[Part], channel: &'c str, captures: &mut Vec<&'c str>) -> bool {
    match parts.split_first() {
        None => channel.is_empty(),
        Some((Part::Literal(l), rest)) => channel
            .strip_prefix(l.as_str())
            .is_some_and(|tail| match_parts(rest, tail, captures)),
        Some((Part::Param(_), rest)) => {
            let run = channel.find(':').unwrap_or(channel.len());
            for (end, _) in channel[..run]
                .char_indices()
                .skip(1)
                .chain(std::iter::once((run, ' ')))
            {
                if end == 0 {
                    continue;
                }
                captures.push(&channel[..end]);
                if match_parts(rest, &channel[end..], captures) {
                    return true;
                }
                captures.pop();
            }
            false
        }
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ChannelPattern {
        ChannelPattern::parse(s).unwrap()
    }

    #[test]
    fn a_channel_without_captures_is_subscribed_literally() {
        let pat = p("alerts:all");
        assert_eq!(pat.literal().as_deref(), Some("alerts:all"));
        assert_eq!(pat.matches("alerts:all"), Some(vec![]));
        assert_eq!(pat.matches("alerts:al"), None);
    }

    #[test]
    fn a_capture_matches_a_run_without_colons() {
        let pat = p("commands:{device_id}");
        assert_eq!(pat.literal(), None);
        assert_eq!(pat.glob(), "commands:*");
        assert_eq!(pat.matches("commands:dev-1"), Some(vec!["dev-1"]));
        assert_eq!(pat.matches("commands:a:b"), None);
        assert_eq!(pat.matches("commands:"), None);
        assert_eq!(pat.matches("commands:a/b+"), Some(vec!["a/b+"]));
    }

    #[test]
    fn captures_between_literals_backtrack() {
        let pat = p("dev{id}-x:{kind}");
        assert_eq!(pat.matches("deva-b-x:on"), Some(vec!["a-b", "on"]));
        assert_eq!(pat.params().collect::<Vec<_>>(), vec!["id", "kind"]);
    }

    #[test]
    fn glob_characters_in_literals_are_escaped() {
        assert_eq!(p("a*[{x}]?").glob(), "a\\*\\[*\\]\\?");
        assert_eq!(p("a*[{x}]?").matches("a*[1]?"), Some(vec!["1"]));
    }

    #[test]
    fn invalid_channel_patterns_are_refused() {
        for bad in [
            "",
            "a:{x}{y}",
            "a:{1x}",
            "a:{x}:{x}",
            "a:{topic}",
            "a:{x",
            "a}",
        ] {
            assert!(
                ChannelPattern::parse(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }
}
