//! Route topic patterns (spec §5.1): `sensors/{device_id}/data`, `+`, a final `#` or
//! `{name...}`; what they capture, the MQTT filter each one needs, and the smallest set of
//! filters that covers a whole route table.
//!
//! The cover matters because a broker delivers one copy per matching subscription: with both
//! `sensors/#` and `sensors/+/data` subscribed, every sensor reading would arrive twice. So
//! the bridge subscribes only to filters no other filter already covers, and dispatches each
//! message to every route that matches it.

use std::fmt;

use crate::mqtt::Subscription;

/// One level of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// A level that must be equal.
    Literal(String),
    /// `{name}`: any one level, captured.
    Param(String),
    /// `+`: any one level, not captured.
    Plus,
    /// `#` (last only): zero or more levels, not captured.
    Hash,
    /// `{name...}` (last only): one or more levels, captured with their `/`.
    Rest(String),
}

/// A compiled route topic pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicPattern {
    raw: String,
    segments: Vec<Segment>,
}

/// Names a template may use without a route capturing them; a param may not shadow them.
pub const RESERVED_NAMES: &[&str] = &[
    "topic",
    "payload",
    "json",
    "session",
    "field",
    "now",
    "now_ms",
    "uuid",
    "payload_sha256",
];

/// Why a pattern is not valid, for `check` to report under the route's `topic` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternError(pub String);

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl TopicPattern {
    pub fn parse(raw: &str) -> Result<TopicPattern, PatternError> {
        let err = |msg: String| Err(PatternError(msg));
        if raw.is_empty() {
            return err("the topic pattern is empty".into());
        }
        if raw.contains('\0') {
            return err("the topic pattern contains a NUL character".into());
        }
        let levels: Vec<&str> = raw.split('/').collect();
        let last = levels.len() - 1;
        let mut segments = Vec::with_capacity(levels.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, level) in levels.iter().enumerate() {
            let segment = if *level == "+" {
                Segment::Plus
            } else if *level == "#" {
                if i != last {
                    return err("`#` may only be the last level".into());
                }
                Segment::Hash
            } else if let Some(inner) = level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                let (name, rest) = match inner.strip_suffix("...") {
                    Some(name) => (name, true),
                    None => (inner, false),
                };
                if !is_identifier(name) {
                    return err(format!(
                        "`{{{inner}}}`: a param name is letters, digits and `_`, not starting with a digit"
                    ));
                }
                if RESERVED_NAMES.contains(&name) {
                    return err(format!(
                        "`{{{name}}}` is a reserved template name; rename the param"
                    ));
                }
                if names.contains(&name) {
                    return err(format!("param `{name}` is captured twice"));
                }
                names.push(name);
                if rest {
                    if i != last {
                        return err(format!("`{{{name}...}}` may only be the last level"));
                    }
                    Segment::Rest(name.to_string())
                } else {
                    Segment::Param(name.to_string())
                }
            } else {
                if level.contains(['+', '#']) {
                    return err(format!(
                        "level `{level}`: `+` and `#` must stand alone in their level"
                    ));
                }
                if level.contains(['{', '}']) {
                    return err(format!(
                        "level `{level}`: a `{{name}}` capture must be the whole level"
                    ));
                }
                Segment::Literal((*level).to_string())
            };
            segments.push(segment);
        }
        Ok(TopicPattern {
            raw: raw.to_string(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The names this pattern captures, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(name) | Segment::Rest(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// True when `name` is captured by a `{name...}` (so it may hold `/`).
    pub fn is_rest_param(&self, name: &str) -> bool {
        matches!(self.segments.last(), Some(Segment::Rest(n)) if n == name)
    }

    /// The MQTT subscription filter that delivers every topic this pattern can match.
    pub fn filter(&self) -> String {
        let levels: Vec<&str> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Param(_) | Segment::Plus => "+",
                Segment::Hash | Segment::Rest(_) => "#",
            })
            .collect();
        levels.join("/")
    }

    /// Matches a published topic; on success, the captured params in pattern order.
    pub fn matches<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        // MQTT-4.7.2-1: wildcards at the first level never match `$` topics.
        let first_is_wildcard = !matches!(self.segments.first(), Some(Segment::Literal(_)));
        if first_is_wildcard && topic.starts_with('$') {
            return None;
        }
        let mut captures = Vec::new();
        let mut rest = Some(topic);
        for segment in &self.segments {
            match segment {
                Segment::Hash => return Some(captures),
                Segment::Rest(_) => {
                    let remainder = rest?;
                    captures.push(remainder);
                    return Some(captures);
                }
                _ => {}
            }
            let remainder = rest?;
            let (level, next) = match remainder.split_once('/') {
                Some((level, next)) => (level, Some(next)),
                None => (remainder, None),
            };
            match segment {
                Segment::Literal(l) if l != level => return None,
                Segment::Param(_) => captures.push(level),
                _ => {}
            }
            rest = next;
        }
        rest.is_none().then_some(captures)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// True when every topic that `narrow` matches is also matched by `wide` (both MQTT filters).
pub fn filter_covers(wide: &str, narrow: &str) -> bool {
    let wide_levels: Vec<&str> = wide.split('/').collect();
    let narrow_levels: Vec<&str> = narrow.split('/').collect();
    // `$` topics are only reached by a literal first level.
    let narrow_first = narrow_levels.first().copied().unwrap_or("");
    let wide_first = wide_levels.first().copied().unwrap_or("");
    if (wide_first == "+" || wide_first == "#") && narrow_first.starts_with('$') {
        return false;
    }
    for (i, w) in wide_levels.iter().enumerate() {
        if *w == "#" {
            return true;
        }
        let Some(n) = narrow_levels.get(i) else {
            return false;
        };
        match *w {
            "+" if *n != "#" => {}
            "+" => return false,
            literal if literal == *n => {}
            _ => return false,
        }
    }
    wide_levels.len() == narrow_levels.len()
}

/// The smallest set of filters that covers `routes` (each `(filter, qos)`), at the highest
/// QoS among the routes each one covers, in first-seen order.
pub fn cover(routes: &[(String, u8)]) -> Vec<Subscription> {
    let mut kept: Vec<&str> = Vec::new();
    for (i, (filter, _)) in routes.iter().enumerate() {
        let covered = routes.iter().enumerate().any(|(j, (other, _))| {
            // Identical filters: the first one stays.
            j != i && filter_covers(other, filter) && (other != filter || j < i)
        });
        if !covered && !kept.contains(&filter.as_str()) {
            kept.push(filter);
        }
    }
    kept.into_iter()
        .map(|filter| Subscription {
            filter: filter.to_string(),
            qos: routes
                .iter()
                .filter(|(f, _)| filter_covers(filter, f))
                .map(|(_, q)| *q)
                .max()
                .unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::parse(s).unwrap()
    }

    #[test]
    fn param_captures_one_level() {
        let pat = p("sensors/{device_id}/data");
        assert_eq!(pat.matches("sensors/dev-1/data"), Some(vec!["dev-1"]));
        assert_eq!(pat.matches("sensors/dev-1/x/data"), None);
        assert_eq!(pat.matches("sensors/dev-1"), None);
        assert_eq!(pat.filter(), "sensors/+/data");
    }

    #[test]
    fn rest_captures_the_remainder_with_slashes() {
        let pat = p("logs/{path...}");
        assert_eq!(pat.matches("logs/a/b/c"), Some(vec!["a/b/c"]));
        assert_eq!(pat.matches("logs"), None);
        assert_eq!(pat.filter(), "logs/#");
        assert!(pat.is_rest_param("path"));
    }

    #[test]
    fn hash_matches_parent_and_children() {
        let pat = p("sensors/#");
        assert!(pat.matches("sensors").is_some());
        assert!(pat.matches("sensors/a/b").is_some());
        assert!(pat.matches("other/a").is_none());
    }

    #[test]
    fn wildcard_first_level_never_matches_dollar_topics() {
        assert!(p("#").matches("$SYS/broker/uptime").is_none());
        assert!(p("+/x").matches("$SYS/x").is_none());
        assert!(p("$SYS/#").matches("$SYS/x").is_some());
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in [
            "",
            "a/#/b",
            "a/{x...}/b",
            "a/b+",
            "a/{x}y",
            "a/{1x}",
            "{x}/{x}",
            "a/{topic}",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn cover_drops_filters_a_wider_one_covers() {
        let subs = cover(&[
            ("sensors/+/data".into(), 1),
            ("sensors/#".into(), 0),
            ("alerts/x".into(), 2),
            ("alerts/x".into(), 1),
        ]);
        assert_eq!(
            subs,
            vec![
                Subscription {
                    filter: "sensors/#".into(),
                    qos: 1
                },
                Subscription {
                    filter: "alerts/x".into(),
                    qos: 2
                },
            ]
        );
    }

    #[test]
    fn filter_covers_follows_mqtt_rules() {
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/+", "a/b/c"));
        assert!(filter_covers("#", "a/+/c"));
        assert!(!filter_covers("#", "$SYS/x"));
        assert!(!filter_covers("a/b", "a/+"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsing_and_matching_never_panic(pattern in "[a-z{}+#/.$ ]{0,24}", topic in "[a-z+#/$ ]{0,24}") {
            if let Ok(p) = TopicPattern::parse(&pattern) {
                let _ = p.matches(&topic);
                let _ = filter_covers(&p.filter(), &topic);
            }
        }

        #[test]
        fn a_match_is_always_delivered_by_the_filter(
            levels in proptest::collection::vec("[a-c]{1,2}", 1..5),
            topic in proptest::collection::vec("[a-c]{1,2}", 1..6),
        ) {
            let pattern = levels.iter().enumerate().map(|(i, l)| match (i, l.as_str()) {
                (0, _) => l.clone(),
                (_, "a") => "+".to_string(),
                (_, "b") => format!("{{p{i}}}"),
                _ => l.clone(),
            }).collect::<Vec<_>>().join("/");
            let p = TopicPattern::parse(&pattern).unwrap();
            let topic = topic.join("/");
            if p.matches(&topic).is_some() {
                prop_assert!(filter_covers(&p.filter(), &topic));
            }
        }
    }
}
