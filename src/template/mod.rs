//! Templates (spec §5.1): the `{device_id}`, `{json.a.b}`, `{payload}` … strings of keys,
//! values, topics, channels and fields.
//!
//! A template is compiled once, when the config is loaded, into a list of parts; rendering a
//! message walks that list and never parses again. Compiling is also where the safety rule is
//! fixed: every value a message controls that lands in a Redis key, a channel or an MQTT topic
//! carries its constraint (the route's `params.<name>` regex or the safe default), so a
//! device cannot write `sensor:*` or publish to `#`.

pub mod json;

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

use base64::Engine as _;
use json::push_json_text;

use crate::message::Properties;

use crate::config::reader::Table;

/// Compiles the template at `key`; `None` (error recorded) when absent and required, or bad.
/// Routes, their stages and republish rules read theirs with it.
pub(crate) fn read(
    t: &mut Table<'_>,
    key: &str,
    target: Target,
    scope: &Scope<'_>,
    default: Option<&str>,
) -> Option<Template> {
    let source = match t.opt_string(key) {
        Some(s) => s,
        None if t.has(key) => return None, // wrong type, already reported
        None => match default {
            Some(d) => d.to_string(),
            None => {
                t.error(key, "is required");
                return None;
            }
        },
    };
    match Template::compile(&source, target, scope) {
        Ok(template) => Some(template),
        Err(message) => {
            t.error(key, message);
            None
        }
    }
}

/// Where a template's output goes: decides what it may contain and what gets checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Redis key: `{payload}` refused, message values checked.
    Key,
    /// A Redis pub/sub channel: as a key.
    Channel,
    /// An MQTT topic: as a key, and the result may not start with `$`.
    Topic,
    /// A value written to Redis or published: anything goes, nothing is checked.
    Value,
}

impl Target {
    fn is_checked(self) -> bool {
        self != Target::Value
    }
}

/// An operator's `params.<name>` regex, matching the **whole** value (spec §5.1).
///
/// The regex crate finds a match anywhere in the text, so `[a-z0-9]+` alone would accept
/// `ab:c*` (it matches `ab`) and let a device into other devices' keys. The pattern is
/// compiled as `^(?:…)$`; the operator's text is kept for errors, `check` and logs, where
/// the added anchors would only confuse.
pub struct Constraint {
    source: String,
    whole: Regex,
}

impl Constraint {
    /// Compiles `source` to match whole values. The error quotes the operator's pattern.
    pub fn new(source: &str) -> Result<Constraint, String> {
        // Checked alone first, so a mistake is reported against what the operator wrote.
        Regex::new(source).map_err(|e| format!("not a valid regex: {e}"))?;
        // A pattern that compiles alone has balanced groups, so it cannot close ours early;
        // only a trailing `(?x)` comment can swallow the closing `)$`.
        let whole = Regex::new(&format!("^(?:{source})$")).map_err(|_| {
            format!(
                "{source:?} cannot be anchored to match whole values \
                 (does it end in an `(?x)` comment? end it with a newline)"
            )
        })?;
        Ok(Constraint {
            source: source.to_string(),
            whole,
        })
    }

    /// Whether `value` matches the pattern from its first to its last character.
    pub fn is_match(&self, value: &str) -> bool {
        self.whole.is_match(value)
    }

    /// The pattern as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Constraint({:?})", self.source)
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The rule a message-controlled value must follow before it lands in a key, channel or topic.
#[derive(Clone, Debug)]
pub enum Check {
    /// `[A-Za-z0-9_.@-]{1,128}`: no `:`, `*`, `/`, `+`, `#`, whitespace or NUL.
    Default,
    /// The default plus `/`, up to 512 (for `{name...}`).
    DefaultRest,
    /// The operator's `params.<name>` regex, matching the whole value.
    Custom(Arc<Constraint>),
    /// Not checked (values).
    None,
}

impl Check {
    fn allows(&self, value: &str, target: Target) -> bool {
        let safe_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-');
        match self {
            Check::Default => (1..=128).contains(&value.len()) && value.chars().all(safe_char),
            Check::DefaultRest => {
                (1..=512).contains(&value.len()) && value.chars().all(|c| safe_char(c) || c == '/')
            }
            // Whatever the operator allows, a topic level may never smuggle in wildcards.
            Check::Custom(re) => {
                re.is_match(value) && !(target == Target::Topic && value.contains(['+', '#', '\0']))
            }
            Check::None => true,
        }
    }
}

/// A path into the JSON payload: `{json.items.0.name}` → `["items", "0", "name"]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath(Vec<String>);

impl JsonPath {
    /// Looks the path up; a numeric segment indexes an array (or is a key of an object).
    pub fn lookup<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.0.iter().try_fold(root, |v, seg| match v {
            Value::Object(map) => map.get(seg),
            Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "json.{}", self.0.join("."))
    }
}

#[derive(Clone, Debug)]
enum Part {
    Literal(String),
    Param {
        index: usize,
        name: String,
        check: Check,
    },
    Topic,
    Payload,
    Json {
        path: JsonPath,
        check: Check,
    },
    Session {
        field: String,
        check: Check,
    },
    Field {
        name: String,
        check: Check,
    },
    /// `{prop.content_type}`, `{prop.response_topic}`, `{prop.correlation_data}` (MQTT 5).
    Prop {
        prop: Prop,
        check: Check,
    },
    /// `{user.NAME}`: an MQTT 5 user property.
    User {
        name: String,
        check: Check,
    },
    Now,
    NowMs,
    Uuid,
    PayloadSha256,
}

impl Part {
    /// The name as written between braces in the template.
    fn name(&self) -> String {
        match self {
            Part::Literal(text) => text.clone(),
            Part::Param { name, .. } => name.clone(),
            Part::Topic => "topic".into(),
            Part::Payload => "payload".into(),
            Part::Json { path, .. } => path.to_string(),
            Part::Session { field, .. } => format!("session.{field}"),
            Part::Field { name, .. } => format!("field.{name}"),
            Part::Prop { prop, .. } => format!("prop.{}", prop.name()),
            Part::User { name, .. } => format!("user.{name}"),
            Part::Now => "now".into(),
            Part::NowMs => "now_ms".into(),
            Part::Uuid => "uuid".into(),
            Part::PayloadSha256 => "payload_sha256".into(),
        }
    }

    /// True when the rendered value can never hold `{` (the default checks allow no braces;
    /// an operator's constraint might).
    fn brace_free(&self) -> bool {
        match self {
            Part::Literal(text) => !text.contains('{'),
            Part::Param { check, .. }
            | Part::Json { check, .. }
            | Part::Session { check, .. }
            | Part::Field { check, .. }
            | Part::Prop { check, .. }
            | Part::User { check, .. } => matches!(check, Check::Default | Check::DefaultRest),
            Part::PayloadSha256 | Part::Now | Part::NowMs | Part::Uuid => true,
            Part::Topic | Part::Payload => false,
        }
    }
}

/// What a template may refer to, and the constraints of the route or rule it belongs to.
pub struct Scope<'a> {
    /// The params the topic pattern (or channel pattern) captures, in capture order.
    pub params: &'a [String],
    /// The one param captured by `{name...}`, which may hold `/`.
    pub rest_param: Option<&'a str>,
    /// Whether `{json.*}` is allowed (the payload is parsed as JSON).
    pub json: bool,
    /// Whether `{session.*}` is allowed (the route has a session).
    pub session: bool,
    /// Whether `{field.*}` is allowed (stream entries).
    pub fields: bool,
    /// Whether `{prop.*}` and `{user.*}` are allowed (messages received over MQTT 5).
    pub properties: bool,
    /// `params.<name>` constraints: `(name, regex)` with names like `device_id`,
    /// `json.a.b`, `session.user`, `field.site`.
    pub constraints: &'a [(String, Arc<Constraint>)],
}

impl Scope<'_> {
    fn check(&self, name: &str, target: Target, rest: bool) -> Check {
        if !target.is_checked() {
            return Check::None;
        }
        match self.constraints.iter().find(|(n, _)| n == name) {
            Some((_, re)) => Check::Custom(re.clone()),
            None if rest => Check::DefaultRest,
            None => Check::Default,
        }
    }
}

/// A compiled template.
#[derive(Clone, Debug)]
pub struct Template {
    source: String,
    target: Target,
    parts: Vec<Part>,
}

/// Why a message could not be rendered; each maps to outcome `invalid` and a dead-letter
/// reason (spec §5.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenderError {
    /// `{payload}` as text, but the payload is not UTF-8 (`invalid_utf8`).
    InvalidUtf8,
    /// `{json.*}`, `{field.*}` or a required `{session.*}` is missing (`missing_field`).
    MissingField(String),
    /// A value broke its constraint (`invalid_param`).
    InvalidParam { name: String, value: String },
    /// A rendered topic starts with `$` (`invalid_param`).
    DollarTopic(String),
}

impl RenderError {
    /// The dead-letter `reason` of spec §5.3.
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::InvalidUtf8 => "invalid_utf8",
            RenderError::MissingField(_) => "missing_field",
            RenderError::InvalidParam { .. } | RenderError::DollarTopic(_) => "invalid_param",
        }
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::InvalidUtf8 => f.write_str("the payload is not valid UTF-8"),
            RenderError::MissingField(name) => write!(f, "`{name}` is missing"),
            RenderError::InvalidParam { name, value } => {
                write!(f, "`{name}` = {value:?} breaks its constraint")
            }
            RenderError::DollarTopic(topic) => {
                write!(f, "rendered topic {topic:?} starts with `$`")
            }
        }
    }
}

impl std::error::Error for RenderError {}

/// What a message offers to its templates.
pub struct Context<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// The captured params, in the order of [`Scope::params`].
    pub params: &'a [&'a str],
    pub json: Option<&'a Value>,
    /// The session's fields; `None` when there is no session (then `{session.*}` is empty).
    pub session: Option<&'a serde_json::Map<String, Value>>,
    /// Stream entry fields, for `{field.*}`.
    pub fields: &'a [(String, Vec<u8>)],
    /// MQTT 5 properties, for `{prop.*}` and `{user.*}`.
    pub properties: Option<&'a Properties>,
    pub now: SystemTime,
}

impl<'a> Context<'a> {
    /// A context for a message with only a topic and a payload.
    pub fn new(topic: &'a str, payload: &'a [u8]) -> Self {
        Context {
            topic,
            payload,
            params: &[],
            json: None,
            session: None,
            fields: &[],
            properties: None,
            now: SystemTime::now(),
        }
    }
}

impl Template {
    /// Compiles `source` for `target` within `scope`. The error says what is wrong, for the
    /// config loader to report under the key path.
    pub fn compile(source: &str, target: Target, scope: &Scope<'_>) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at byte {i}; write `}}}}` for a literal brace"
                    ))
                }
                '{' => {
                    let rest = &source[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!(
                            "unclosed `{{` at byte {i}; write `{{{{` for a literal brace"
                        ));
                    };
                    let name = &rest[..end];
                    for _ in 0..=name.chars().count() {
                        chars.next();
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Self::placeholder(name, target, scope)?);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_string(),
            target,
            parts,
        })
    }

    fn placeholder(name: &str, target: Target, scope: &Scope<'_>) -> Result<Part, String> {
        let dotted = |prefix: &str| -> Result<Option<String>, String> {
            match name.strip_prefix(prefix) {
                Some(rest) if rest.is_empty() || rest.split('.').any(str::is_empty) => {
                    Err(format!("`{{{name}}}`: an empty name after `{prefix}`"))
                }
                Some(rest) => Ok(Some(rest.to_string())),
                None => Ok(None),
            }
        };
        let part = match name {
            "topic" => Part::Topic,
            "payload" => {
                if target != Target::Value {
                    return Err(format!(
                        "`{{payload}}` may not stand in a {}",
                        target_name(target)
                    ));
                }
                Part::Payload
            }
            "now" => Part::Now,
            "now_ms" => Part::NowMs,
            "uuid" => Part::Uuid,
            "payload_sha256" => Part::PayloadSha256,
            _ => {
                if let Some(path) = dotted("json.")? {
                    if !scope.json {
                        return Err(format!(
                            "`{{{name}}}` needs a JSON payload (`payload = \"json\"`)"
                        ));
                    }
                    Part::Json {
                        path: JsonPath(path.split('.').map(str::to_string).collect()),
                        check: scope.check(name, target, false),
                    }
                } else if let Some(field) = dotted("session.")? {
                    if !scope.session {
                        return Err(format!("`{{{name}}}` needs a `[routes.session]`"));
                    }
                    Part::Session {
                        check: scope.check(name, target, false),
                        field,
                    }
                } else if let Some(field) = dotted("field.")? {
                    if !scope.fields {
                        return Err(format!("`{{{name}}}` is only available to stream entries"));
                    }
                    Part::Field {
                        check: scope.check(name, target, false),
                        name: field,
                    }
                } else if let Some(prop) = dotted("prop.")? {
                    let Some(prop) = Prop::parse(&prop) else {
                        return Err(format!(
                            "`{{{name}}}` is not a property; known: prop.content_type, \
                             prop.response_topic, prop.correlation_data, user.NAME"
                        ));
                    };
                    needs_properties(name, scope)?;
                    Part::Prop {
                        check: scope.check(name, target, false),
                        prop,
                    }
                } else if let Some(user) = dotted("user.")? {
                    needs_properties(name, scope)?;
                    Part::User {
                        check: scope.check(name, target, false),
                        name: user,
                    }
                } else if let Some(index) = scope.params.iter().position(|p| p == name) {
                    let rest = scope.rest_param == Some(name);
                    Part::Param {
                        index,
                        name: name.to_string(),
                        check: scope.check(name, target, rest),
                    }
                } else {
                    let known = if scope.params.is_empty() {
                        "none".to_string()
                    } else {
                        scope.params.join(", ")
                    };
                    return Err(format!(
                        "`{{{name}}}` is not a captured param (captured: {known}) nor a built-in"
                    ));
                }
            }
        };
        Ok(part)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The Redis Cluster hash tag of every key this template renders, as template text
    /// (`sensor:{{{device_id}}}:x` → `{device_id}`), when it can be proven from the template
    /// alone: the first `{` of the key is a literal one (no placeholder before it may hold a
    /// brace), a literal `}` follows, and what stands between is non-empty and renders the
    /// same for every key of one message (no `{now}`, `{now_ms}`, `{uuid}`). Two keys of one
    /// message whose tags are equal text therefore land in one slot (spec §10).
    pub fn hash_tag(&self) -> Option<String> {
        let mut inner = String::new();
        let mut open = false;
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    for c in text.chars() {
                        match (open, c) {
                            (false, '{') => open = true,
                            (false, _) => {}
                            (true, '}') => return (!inner.is_empty()).then_some(inner),
                            (true, '{') => inner.push_str("{{"),
                            (true, c) => inner.push(c),
                        }
                    }
                }
                Part::Now | Part::NowMs | Part::Uuid => return None,
                // Before the opening brace, only placeholders that cannot render a brace.
                _ if !open && !part.brace_free() => return None,
                _ if !open => {}
                _ => inner.push_str(&format!("{{{}}}", part.name())),
            }
        }
        None
    }

    /// The placeholder source of the first placeholder a hash tag could be made of
    /// (`{device_id}`), for suggesting a fix.
    pub fn first_placeholder(&self) -> Option<String> {
        self.parts.iter().find_map(|part| match part {
            Part::Literal(_) | Part::Now | Part::NowMs | Part::Uuid => None,
            _ => Some(format!("{{{}}}", part.name())),
        })
    }

    /// True when the template is exactly `{payload}`: the raw bytes go through untouched.
    pub fn is_raw_payload(&self) -> bool {
        matches!(self.parts.as_slice(), [Part::Payload])
    }

    /// Renders as bytes: a template that is exactly `{payload}` borrows the payload as it is
    /// (any bytes); everything else renders as text.
    pub fn render_bytes<'c>(&self, ctx: &'c Context<'_>) -> Result<Cow<'c, [u8]>, RenderError> {
        if self.is_raw_payload() {
            return Ok(Cow::Borrowed(ctx.payload));
        }
        self.render(ctx).map(|s| Cow::Owned(s.into_bytes()))
    }

    /// Renders as text, checking every message-controlled value against its constraint.
    pub fn render(&self, ctx: &Context<'_>) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.push_str(ctx.topic),
                Part::Payload => out.push_str(
                    std::str::from_utf8(ctx.payload).map_err(|_| RenderError::InvalidUtf8)?,
                ),
                Part::Now => out.push_str(&unix(ctx.now).as_secs().to_string()),
                Part::NowMs => out.push_str(&unix(ctx.now).as_millis().to_string()),
                Part::Uuid => {
                    let _ = write!(out, "{}", uuid::Uuid::new_v4().hyphenated());
                }
                Part::PayloadSha256 => {
                    for byte in Sha256::digest(ctx.payload) {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
                Part::Param { index, name, check } => {
                    let value = ctx.params.get(*index).copied().unwrap_or("");
                    self.push_checked(&mut out, || name.to_string(), value, check)?;
                }
                Part::Json { path, check } => {
                    let value = ctx
                        .json
                        .and_then(|root| path.lookup(root))
                        .ok_or_else(|| RenderError::MissingField(path.to_string()))?;
                    // Written straight into `out` and checked there: no copy of the value and
                    // no field name unless the check fails (this runs for every message).
                    let start = out.len();
                    push_json_text(&mut out, value);
                    self.check_tail(&out, start, || path.to_string(), check)?;
                }
                Part::Session { field, check } => {
                    // No session (and none required): empty. A session without the field
                    // is a missing field, as for `{json.*}`.
                    let start = out.len();
                    if let Some(session) = ctx.session {
                        let value = session
                            .get(field)
                            .ok_or_else(|| RenderError::MissingField(format!("session.{field}")))?;
                        push_json_text(&mut out, value);
                    }
                    self.check_tail(&out, start, || format!("session.{field}"), check)?;
                }
                Part::Field { name, check } => {
                    let value = ctx
                        .fields
                        .iter()
                        .find(|(n, _)| n == name)
                        .ok_or_else(|| RenderError::MissingField(format!("field.{name}")))?;
                    let text =
                        std::str::from_utf8(&value.1).map_err(|_| RenderError::InvalidUtf8)?;
                    self.push_checked(&mut out, || format!("field.{name}"), text, check)?;
                }
                Part::Prop { prop, check } => {
                    let missing = || RenderError::MissingField(format!("prop.{}", prop.name()));
                    let props = ctx.properties.ok_or_else(missing)?;
                    let start = out.len();
                    match prop {
                        Prop::ContentType => {
                            out.push_str(props.content_type.as_deref().ok_or_else(missing)?)
                        }
                        Prop::ResponseTopic => {
                            out.push_str(props.response_topic.as_deref().ok_or_else(missing)?)
                        }
                        Prop::CorrelationData => {
                            let data = props.correlation_data.as_ref().ok_or_else(missing)?;
                            base64::engine::general_purpose::STANDARD.encode_string(data, &mut out);
                        }
                    }
                    self.check_tail(&out, start, || format!("prop.{}", prop.name()), check)?;
                }
                Part::User { name, check } => {
                    let value = ctx
                        .properties
                        .and_then(|p| p.user(name))
                        .ok_or_else(|| RenderError::MissingField(format!("user.{name}")))?;
                    self.push_checked(&mut out, || format!("user.{name}"), value, check)?;
                }
            }
        }
        if self.target == Target::Topic && out.starts_with('$') {
            return Err(RenderError::DollarTopic(out));
        }
        Ok(out)
    }

    /// `name` is called only for the error: a field name is not built per message.
    fn push_checked(
        &self,
        out: &mut String,
        name: impl FnOnce() -> String,
        value: &str,
        check: &Check,
    ) -> Result<(), RenderError> {
        let start = out.len();
        out.push_str(value);
        self.check_tail(out, start, name, check)
    }

    /// Checks what was appended to `out` since `start`.
    fn check_tail(
        &self,
        out: &str,
        start: usize,
        name: impl FnOnce() -> String,
        check: &Check,
    ) -> Result<(), RenderError> {
        let value = &out[start..];
        if !check.allows(value, self.target) {
            return Err(RenderError::InvalidParam {
                name: name(),
                value: value.chars().take(200).collect(),
            });
        }
        Ok(())
    }
}

/// A PUBLISH property a template can read (`{prop.NAME}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prop {
    ContentType,
    ResponseTopic,
    /// Binary in MQTT: rendered in base64.
    CorrelationData,
}

impl Prop {
    fn parse(name: &str) -> Option<Prop> {
        match name {
            "content_type" => Some(Prop::ContentType),
            "response_topic" => Some(Prop::ResponseTopic),
            "correlation_data" => Some(Prop::CorrelationData),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Prop::ContentType => "content_type",
            Prop::ResponseTopic => "response_topic",
            Prop::CorrelationData => "correlation_data",
        }
    }
}

/// `{prop.*}` and `{user.*}` exist only where messages arrive over MQTT 5.
fn needs_properties(name: &str, scope: &Scope<'_>) -> Result<(), String> {
    if scope.properties {
        Ok(())
    } else {
        Err(format!(
            "`{{{name}}}` needs MQTT 5 properties: set mqtt.protocol = \"5\" (only route \
             messages carry them)"
        ))
    }
}

fn target_name(target: Target) -> &'static str {
    match target {
        Target::Key => "key",
        Target::Channel => "channel",
        Target::Topic => "topic",
        Target::Value => "value",
    }
}

fn unix(now: SystemTime) -> std::time::Duration {
    now.duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope<'a>(params: &'a [String], constraints: &'a [(String, Arc<Constraint>)]) -> Scope<'a> {
        Scope {
            params,
            rest_param: None,
            json: true,
            session: true,
            fields: false,
            properties: true,
            constraints,
        }
    }

    #[test]
    fn renders_params_json_and_builtins() {
        let params = vec!["device_id".to_string()];
        let s = scope(&params, &[]);
        let t = Template::compile("sensor:{device_id}:{json.seq}:{{x}}", Target::Key, &s).unwrap();
        let json: Value = serde_json::json!({"seq": 7});
        let mut ctx = Context::new("sensors/d1/data", b"{\"seq\":7}");
        ctx.params = &["d1"];
        ctx.json = Some(&json);
        assert_eq!(t.render(&ctx).unwrap(), "sensor:d1:7:{x}");
        let sha = Template::compile("{payload_sha256}", Target::Value, &s).unwrap();
        assert_eq!(sha.render(&ctx).unwrap().len(), 64);
    }

    #[test]
    fn payload_in_a_key_is_a_config_error() {
        let s = scope(&[], &[]);
        assert!(Template::compile("x:{payload}", Target::Key, &s).is_err());
        assert!(Template::compile("{payload}", Target::Topic, &s).is_err());
        assert!(Template::compile("{payload}", Target::Value, &s).is_ok());
    }

    #[test]
    fn unknown_param_is_a_config_error() {
        let s = scope(&[], &[]);
        let err = Template::compile("x:{device}", Target::Key, &s).unwrap_err();
        assert!(err.contains("device"), "{err}");
    }

    #[test]
    fn unsafe_values_are_refused_in_keys_but_not_values() {
        let params = vec!["id".to_string()];
        let s = scope(&params, &[]);
        let key = Template::compile("k:{id}", Target::Key, &s).unwrap();
        let value = Template::compile("{id}", Target::Value, &s).unwrap();
        for bad in ["a:b", "*", "a b", "", "a/b", "+", "#"] {
            let mut ctx = Context::new("t", b"");
            let params = [bad];
            ctx.params = &params;
            assert!(
                matches!(key.render(&ctx), Err(RenderError::InvalidParam { .. })),
                "{bad:?}"
            );
            assert_eq!(value.render(&ctx).unwrap(), bad);
        }
    }

    #[test]
    fn custom_constraint_replaces_the_default() {
        let params = vec!["id".to_string()];
        let constraints = vec![(
            "id".to_string(),
            Arc::new(Constraint::new("^[a-z]{1,3}$").unwrap()),
        )];
        let s = scope(&params, &constraints);
        let key = Template::compile("k:{id}", Target::Key, &s).unwrap();
        let mut ctx = Context::new("t", b"");
        ctx.params = &["abcd"];
        assert!(key.render(&ctx).is_err());
        ctx.params = &["abc"];
        assert_eq!(key.render(&ctx).unwrap(), "k:abc");
    }

    #[test]
    fn a_constraint_matches_whole_values_whatever_its_anchors() {
        for source in ["[a-z0-9]+", "^[a-z0-9]+$", "(?i)[A-Z0-9]+", "ab|[0-9]+"] {
            let c = Constraint::new(source).unwrap();
            assert_eq!(c.as_str(), source);
            assert!(c.is_match("ab"), "{source}");
            assert!(!c.is_match("ab:c*"), "{source}");
        }
        // Alternatives are anchored together, not just the first and the last.
        let c = Constraint::new("ab|[0-9]+").unwrap();
        assert!(!c.is_match("abx") && !c.is_match("x1"));
        // A trailing comment in verbose mode would swallow the anchors: refused, not loosened.
        let err = Constraint::new("(?x)[a-z]+ # letters").unwrap_err();
        assert!(err.contains("comment"), "{err}");
        assert!(Constraint::new("(?x)[a-z]+ # letters\n").is_ok());
        let err = Constraint::new("[a-z").unwrap_err();
        assert!(err.contains("[a-z") && !err.contains("(?:"), "{err}");
    }

    #[test]
    fn json_values_keep_their_digits_and_key_order() {
        let s = scope(&[], &[]);
        let key = Template::compile("dev:{json.id}", Target::Key, &s).unwrap();
        let value =
            Template::compile("{json.id}|{json.f}|{json.o}|{json.l}", Target::Value, &s).unwrap();
        let render = |t: &Template, payload: &str| {
            let json: Value = serde_json::from_str(payload).unwrap();
            let mut ctx = Context::new("t", payload.as_bytes());
            ctx.json = Some(&json);
            t.render(&ctx).unwrap()
        };
        // Two devices whose ids differ beyond f64's 17 digits must not share a key.
        assert_eq!(
            render(&key, r#"{"id": 123456789012345678901}"#),
            "dev:123456789012345678901"
        );
        assert_eq!(
            render(&key, r#"{"id": 123456789012345678902}"#),
            "dev:123456789012345678902"
        );
        assert_eq!(
            render(&key, r#"{"id": -123456789012345678901234567890}"#),
            "dev:-123456789012345678901234567890"
        );
        assert_eq!(
            render(
                &value,
                r#"{"id": 18446744073709551616, "f": 1.10,
                    "o": { "z" : 1 , "a" : [ 2.50 , -0.0 ] , "m" : { } }, "l": [ 1.0, "x" ]}"#
            ),
            r#"18446744073709551616|1.10|{"z":1,"a":[2.50,-0.0],"m":{}}|[1.0,"x"]"#
        );
    }

    #[test]
    fn missing_json_field_is_reported() {
        let s = scope(&[], &[]);
        let t = Template::compile("{json.a.b}", Target::Value, &s).unwrap();
        let json = serde_json::json!({"a": {}});
        let mut ctx = Context::new("t", b"{}");
        ctx.json = Some(&json);
        assert_eq!(
            t.render(&ctx),
            Err(RenderError::MissingField("json.a.b".into()))
        );
    }

    #[test]
    fn raw_payload_passes_non_utf8_bytes() {
        let s = scope(&[], &[]);
        let t = Template::compile("{payload}", Target::Value, &s).unwrap();
        let ctx = Context::new("t", &[0xff, 0x00]);
        assert_eq!(t.render_bytes(&ctx).unwrap().as_ref(), &[0xff, 0x00]);
        assert_eq!(t.render(&ctx), Err(RenderError::InvalidUtf8));
    }

    #[test]
    fn session_fields_are_empty_without_a_session_and_missing_when_absent_from_one() {
        let s = scope(&[], &[]);
        let t = Template::compile("<{session.role}>", Target::Value, &s).unwrap();
        let mut ctx = Context::new("t", b"");
        assert_eq!(t.render(&ctx).unwrap(), "<>");
        let session: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"user":"ann"}"#).unwrap();
        ctx.session = Some(&session);
        assert_eq!(
            t.render(&ctx),
            Err(RenderError::MissingField("session.role".into()))
        );
    }

    #[test]
    fn an_unsafe_value_is_reported_under_its_template_name() {
        let params = vec!["id".to_string()];
        let s = scope(&params, &[]);
        let json = serde_json::json!({"a": {"b": "x:y"}});
        let session: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"user":"a b"}"#).unwrap();
        let mut ctx = Context::new("t", b"");
        ctx.params = &["p/q"];
        ctx.json = Some(&json);
        ctx.session = Some(&session);
        for (source, name, value) in [
            ("k:{id}", "id", "p/q"),
            ("k:{json.a.b}", "json.a.b", "x:y"),
            ("k:{session.user}", "session.user", "a b"),
        ] {
            let t = Template::compile(source, Target::Key, &s).unwrap();
            assert_eq!(
                t.render(&ctx),
                Err(RenderError::InvalidParam {
                    name: name.into(),
                    value: value.into()
                }),
                "{source}"
            );
        }
    }

    #[test]
    fn dollar_topics_are_refused() {
        let params = vec!["p".to_string()];
        let s = scope(&params, &[]);
        let t = Template::compile("{topic}", Target::Topic, &s).unwrap();
        let ctx = Context::new("$SYS/x", b"");
        assert!(matches!(t.render(&ctx), Err(RenderError::DollarTopic(_))));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn compiling_and_rendering_never_panic(
            source in "[a-z{}.:_0-9]{0,32}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            param in ".{0,16}",
        ) {
            let params = vec!["id".to_string()];
            let scope = Scope { params: &params, rest_param: None, json: true, session: true, fields: true, properties: true, constraints: &[] };
            for target in [Target::Key, Target::Value, Target::Topic] {
                if let Ok(t) = Template::compile(&source, target, &scope) {
                    let json = serde_json::from_slice::<Value>(&payload).ok();
                    let p = [param.as_str()];
                    let mut ctx = Context::new("a/b", &payload);
                    ctx.params = &p;
                    ctx.json = json.as_ref();
                    let _ = t.render(&ctx);
                    let _ = t.render_bytes(&ctx);
                }
            }
        }
    }
}
