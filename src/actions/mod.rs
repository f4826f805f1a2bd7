//! Actions (spec §5.2): what a route does with a message that passed its middleware.
//!
//! Every Redis action of one message goes into one pipeline — a MULTI/EXEC transaction
//! unless the route says `atomic = false` — so a message costs one round trip whatever its
//! action count, and the dedup done-mark rides in the same transaction. `mqtt_publish`
//! actions are rendered with the rest (so a bad template fails the message before anything
//! is written) and published only after the Redis part succeeded.
//!
//! To add an action: its name in `read.rs`'s `OPS` and its reading there, a variant in
//! [`Op`], its commands in [`Action::apply`] — this folder alone.

mod read;
pub(crate) use read::read_action;

use std::time::Duration;

use ::redis::Pipeline;
use serde_json::{Map, Value};

pub use crate::mqtt::forward::MqttOut;
use crate::mqtt::properties::PropertyTemplates;
use crate::outcome::{Outcome, Reason};
use crate::stage::{failed, Env, Step};
use crate::template::json::{compact, json_text};
use crate::template::{Context, RenderError, Template};

/// A value for `set_json`: a TOML table (or array) whose string leaves are templates.
#[derive(Clone, Debug)]
pub enum JsonTemplate {
    Literal(Value),
    Text(Template),
    Array(Vec<JsonTemplate>),
    Object(Vec<(String, JsonTemplate)>),
}

impl JsonTemplate {
    fn render(&self, ctx: &Context<'_>) -> Result<Value, RenderError> {
        Ok(match self {
            JsonTemplate::Literal(v) => v.clone(),
            JsonTemplate::Text(t) => Value::String(t.render(ctx)?),
            JsonTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.render(ctx))
                    .collect::<Result<_, _>>()?,
            ),
            JsonTemplate::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(ctx)?)))
                    .collect::<Result<Map<_, _>, RenderError>>()?,
            ),
        })
    }
}

/// `hset`'s fields: a table of templates, or the JSON payload's top level spread out.
#[derive(Clone, Debug)]
pub enum HashFields {
    Templates(Vec<(String, Template)>),
    Json,
}

/// When a written key expires (`ex` / `px`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Seconds(u64),
    Millis(u64),
}

impl Expiry {
    pub fn from_ex(d: Duration) -> Expiry {
        Expiry::Seconds(d.as_secs().max(1))
    }

    pub fn from_px(d: Duration) -> Expiry {
        Expiry::Millis((d.as_millis() as u64).max(1))
    }

    fn as_millis(self) -> u64 {
        match self {
            Expiry::Seconds(s) => s.saturating_mul(1000),
            Expiry::Millis(ms) => ms,
        }
    }
}

/// One action's operation and its own settings.
#[derive(Clone, Debug)]
pub enum Op {
    Set {
        value: Template,
        nx: bool,
        xx: bool,
    },
    /// `None`: the payload itself, as received without whitespace.
    SetJson {
        value: Option<JsonTemplate>,
    },
    Hset {
        fields: HashFields,
    },
    Incr {
        by: i64,
    },
    Lpush {
        value: Template,
        max_len: Option<u64>,
    },
    Rpush {
        value: Template,
        max_len: Option<u64>,
    },
    Xadd {
        fields: Vec<(String, Template)>,
        max_len: Option<u64>,
    },
    /// `ZADD key score member`; `max_len` keeps the highest-scored.
    Zadd {
        score: Template,
        member: Template,
        max_len: Option<u64>,
    },
    Publish {
        channel: Template,
        message: Template,
    },
    Expire,
    MqttPublish {
        topic: Template,
        payload: Template,
        qos: u8,
        retain: bool,
        /// MQTT 5 publish properties.
        properties: Option<Box<PropertyTemplates>>,
    },
}

/// A compiled action.
#[derive(Clone, Debug)]
pub struct Action {
    pub op: Op,
    /// The Redis key (absent for `publish` and `mqtt_publish`).
    pub key: Option<Template>,
    pub expiry: Option<Expiry>,
}

/// Why an action could not be rendered for this message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    Render(RenderError),
    /// `hset fields = "json"` or `set_json` on a payload that does not fit.
    NotJson(String),
    /// A value the message controls that Redis would refuse (a `zadd` score that is no
    /// number).
    BadValue(String),
}

impl From<RenderError> for ApplyError {
    fn from(e: RenderError) -> Self {
        ApplyError::Render(e)
    }
}

/// A message's actions, rendered: the pipeline of its Redis commands and the forwards to
/// publish once they are written.
pub struct Writes {
    pub pipe: Pipeline,
    pub forwards: Vec<MqttOut>,
}

/// Renders `actions` for the message in `ctx`; a render error is the message's outcome
/// (`invalid`), before anything is written.
pub fn render(actions: &[Action], ctx: &Context<'_>) -> Step<Writes> {
    let mut pipe = ::redis::pipe();
    let mut forwards = Vec::new();
    for action in actions {
        match action.apply(&mut pipe, ctx) {
            Ok(Some(out)) => forwards.push(out),
            Ok(None) => {}
            Err(ApplyError::Render(e)) => return Err(Outcome::from_render(&e)),
            Err(ApplyError::NotJson(detail)) => {
                return Err(Outcome::invalid(Reason::InvalidJson, detail))
            }
            Err(ApplyError::BadValue(detail)) => {
                return Err(Outcome::invalid(Reason::InvalidParam, detail))
            }
        }
    }
    Ok(Writes { pipe, forwards })
}

/// Makes `pipe` one MULTI/EXEC when `atomic` and it holds more than one command: one command
/// is atomic by itself, and MULTI/EXEC around it would triple Redis's work and the bytes on
/// the wire for nothing (the common one-`set` route).
pub fn seal(pipe: &mut Pipeline, atomic: bool) {
    if atomic && pipe.len() > 1 {
        pipe.atomic();
    }
}

/// Writes `pipe` (a route without dedup), waiting out Redis trouble; a permanent error is
/// the message's outcome (`failed`).
pub async fn write(env: &Env<'_>, pipe: &Pipeline) -> Step<()> {
    // A route with `atomic = false` may span a cluster's slots (spec §10); on Sentinel the
    // write counts once `wait_replicas` replicas have it.
    env.until_redis(|| env.redis.query_pipeline_durable(pipe))
        .await
        .map_err(failed)
}

/// Publishes the forwards of a written message, each confirmed by the broker.
pub async fn forward(env: &Env<'_>, forwards: Vec<MqttOut>) -> Step<()> {
    for out in forwards {
        env.forwarder
            .send(out)
            .await
            .map_err(|detail| Outcome::Failed { detail })?;
    }
    Ok(())
}

impl Action {
    /// Adds this action's commands to `pipe` (replies ignored but checked for errors), or
    /// returns the forward to send after the pipeline.
    pub fn apply(
        &self,
        pipe: &mut Pipeline,
        ctx: &Context<'_>,
    ) -> Result<Option<MqttOut>, ApplyError> {
        let key = match &self.key {
            Some(t) => t.render(ctx)?,
            None => String::new(),
        };
        let mut expire_after = self.expiry;
        match &self.op {
            Op::Set { value, nx, xx } => {
                let cmd = pipe
                    .cmd("SET")
                    .arg(&key)
                    .arg(value.render_bytes(ctx)?.as_ref());
                match self.expiry {
                    Some(Expiry::Seconds(s)) => cmd.arg("EX").arg(s),
                    Some(Expiry::Millis(ms)) => cmd.arg("PX").arg(ms),
                    None => cmd,
                };
                if *nx {
                    cmd.arg("NX");
                }
                if *xx {
                    cmd.arg("XX");
                }
                cmd.ignore();
                expire_after = None;
            }
            Op::SetJson { value } => {
                let text = match value {
                    Some(t) => t.render(ctx)?.to_string().into_bytes(),
                    // The payload parsed, so its bytes are JSON: stored as received, only
                    // without whitespace (see `router::json` for why not re-serialised).
                    None if ctx.json.is_some() => compact(ctx.payload),
                    None => {
                        return Err(ApplyError::NotJson("set_json needs a JSON payload".into()))
                    }
                };
                let cmd = pipe.cmd("SET").arg(&key).arg(text);
                match self.expiry {
                    Some(Expiry::Seconds(s)) => cmd.arg("EX").arg(s),
                    Some(Expiry::Millis(ms)) => cmd.arg("PX").arg(ms),
                    None => cmd,
                };
                cmd.ignore();
                expire_after = None;
            }
            Op::Hset { fields } => {
                let cmd = pipe.cmd("HSET").arg(&key);
                match fields {
                    HashFields::Templates(fields) => {
                        for (name, value) in fields {
                            cmd.arg(name).arg(value.render_bytes(ctx)?.as_ref());
                        }
                    }
                    HashFields::Json => {
                        let Some(Value::Object(map)) = ctx.json else {
                            return Err(ApplyError::NotJson(
                                "hset fields = \"json\" needs a JSON object payload".into(),
                            ));
                        };
                        if map.is_empty() {
                            return Err(ApplyError::NotJson(
                                "hset fields = \"json\": the JSON object is empty".into(),
                            ));
                        }
                        for (name, value) in map {
                            cmd.arg(name).arg(json_text(value).as_ref());
                        }
                    }
                }
                cmd.ignore();
            }
            Op::Incr { by } => {
                pipe.cmd("INCRBY").arg(&key).arg(*by).ignore();
            }
            Op::Lpush { value, max_len } | Op::Rpush { value, max_len } => {
                let left = matches!(self.op, Op::Lpush { .. });
                pipe.cmd(if left { "LPUSH" } else { "RPUSH" })
                    .arg(&key)
                    .arg(value.render_bytes(ctx)?.as_ref())
                    .ignore();
                if let Some(n) = max_len {
                    // Keep the newest n: at the head for LPUSH, at the tail for RPUSH.
                    let n = i64::try_from(*n).unwrap_or(i64::MAX);
                    let (start, stop) = if left { (0, n - 1) } else { (-n, -1) };
                    pipe.cmd("LTRIM").arg(&key).arg(start).arg(stop).ignore();
                }
            }
            Op::Xadd { fields, max_len } => {
                let cmd = pipe.cmd("XADD").arg(&key);
                if let Some(n) = max_len {
                    cmd.arg("MAXLEN").arg("~").arg(*n);
                }
                cmd.arg("*");
                for (name, value) in fields {
                    cmd.arg(name).arg(value.render_bytes(ctx)?.as_ref());
                }
                cmd.ignore();
            }
            Op::Zadd {
                score,
                member,
                max_len,
            } => {
                let score = score.render(ctx)?;
                if score.trim().parse::<f64>().map_or(true, f64::is_nan) {
                    return Err(ApplyError::BadValue(format!(
                        "zadd score {score:?} is not a number"
                    )));
                }
                pipe.cmd("ZADD")
                    .arg(&key)
                    .arg(score.trim())
                    .arg(member.render_bytes(ctx)?.as_ref())
                    .ignore();
                if let Some(n) = max_len {
                    // Keep the n highest: drop ranks 0 ..= -(n + 1) (lowest scores first).
                    let stop = -i64::try_from(*n).unwrap_or(i64::MAX) - 1;
                    pipe.cmd("ZREMRANGEBYRANK")
                        .arg(&key)
                        .arg(0)
                        .arg(stop)
                        .ignore();
                }
            }
            Op::Publish { channel, message } => {
                pipe.cmd("PUBLISH")
                    .arg(channel.render(ctx)?)
                    .arg(message.render_bytes(ctx)?.as_ref())
                    .ignore();
                expire_after = None;
            }
            Op::Expire => {
                if let Some(expiry) = self.expiry {
                    pipe.cmd("PEXPIRE")
                        .arg(&key)
                        .arg(expiry.as_millis())
                        .ignore();
                }
                expire_after = None;
            }
            Op::MqttPublish {
                topic,
                payload,
                qos,
                retain,
                properties,
            } => {
                let properties = match properties {
                    Some(p) => Some(Box::new(p.render(ctx)?)),
                    None => None,
                };
                return Ok(Some(MqttOut {
                    topic: topic.render(ctx)?,
                    payload: payload.render_bytes(ctx)?.into_owned(),
                    qos: *qos,
                    retain: *retain,
                    properties,
                }));
            }
        }
        if let Some(expiry) = expire_after {
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(expiry.as_millis())
                .ignore();
        }
        Ok(None)
    }

    /// The op's name, as in the config (`set`, `mqtt_publish`, …).
    pub fn describe(&self) -> String {
        match &self.op {
            Op::Set { .. } => "set",
            Op::SetJson { .. } => "set_json",
            Op::Hset { .. } => "hset",
            Op::Incr { .. } => "incr",
            Op::Lpush { .. } => "lpush",
            Op::Rpush { .. } => "rpush",
            Op::Xadd { .. } => "xadd",
            Op::Zadd { .. } => "zadd",
            Op::Publish { .. } => "publish",
            Op::Expire => "expire",
            Op::MqttPublish { .. } => "mqtt_publish",
        }
        .to_string()
    }

    /// Whether this action writes to Redis (a route of only `mqtt_publish` needs no Redis).
    pub fn needs_redis(&self) -> bool {
        !matches!(self.op, Op::MqttPublish { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{Scope, Target};

    /// Awkward JSON as a device might send it, and the text `set_json` must store: the
    /// same bytes without insignificant whitespace (spec §5.2).
    const CORPUS: &[(&str, &str)] = &[
        (
            r#"{"z":1,"a":2,"big":123456789012345678901234567890,"f":1.10}"#,
            r#"{"z":1,"a":2,"big":123456789012345678901234567890,"f":1.10}"#,
        ),
        (
            "[ 123456789012345678901234567890 , -123456789012345678901234567890,\n 18446744073709551616 , -9223372036854775809 ]",
            "[123456789012345678901234567890,-123456789012345678901234567890,18446744073709551616,-9223372036854775809]",
        ),
        (
            r#"{ "e1" : 1e5 , "e2" : 1E-7 , "e3" : -0.0 , "e4" : 2.5E+10 , "d" : 1.10 , "n" : -0 }"#,
            r#"{"e1":1e5,"e2":1E-7,"e3":-0.0,"e4":2.5E+10,"d":1.10,"n":-0}"#,
        ),
        (
            r#"{ "s" : "caf\u00e9 \ud83d\ude00" , "q" : "say \"hi\"  \\ back\\slash \/ \t" , "raw" : "é 😀" }"#,
            r#"{"s":"caf\u00e9 \ud83d\ude00","q":"say \"hi\"  \\ back\\slash \/ \t","raw":"é 😀"}"#,
        ),
        (
            r#"{"tricky": "\\", "next" : "a \" b", "k\"ey" : [ "\\\"" , " " ] }"#,
            r#"{"tricky":"\\","next":"a \" b","k\"ey":["\\\""," "]}"#,
        ),
        (
            r#"{"a":{"b":{"c":[1,[2,[3,{"d":null}]]]}} , "t" : true , "f" : false}"#,
            r#"{"a":{"b":{"c":[1,[2,[3,{"d":null}]]]}},"t":true,"f":false}"#,
        ),
        (
            r#"{ "o" : { } , "l" : [ ] , "lo" : [ { } , [ ] ] }"#,
            r#"{"o":{},"l":[],"lo":[{},[]]}"#,
        ),
        (
            "\n\t{ \r\n \"k\" :\t[ 1 ,\n 2 ,\r\n\t3 ] , \"b\" : 1 , \"a\" : { \"y\" : 1 , \"x\" : 2 } }\n ",
            r#"{"k":[1,2,3],"b":1,"a":{"y":1,"x":2}}"#,
        ),
        ("  \"just a string\"  ", r#""just a string""#),
        (" 42 ", "42"),
        ("[]", "[]"),
    ];

    fn action(op: Op) -> Action {
        let scope = Scope {
            params: &[],
            rest_param: None,
            json: true,
            session: false,
            fields: false,
            properties: false,
            constraints: &[],
        };
        Action {
            op,
            key: Some(Template::compile("k", Target::Key, &scope).expect("template")),
            expiry: None,
        }
    }

    /// The arguments of every command `action` puts in a pipeline for `payload`.
    fn commands(action: &Action, payload: &str) -> Vec<Vec<Vec<u8>>> {
        let json: Value = serde_json::from_str(payload).expect("corpus is JSON");
        let mut ctx = Context::new("t", payload.as_bytes());
        ctx.json = Some(&json);
        let mut pipe = ::redis::pipe();
        action.apply(&mut pipe, &ctx).expect("applies");
        pipe.cmd_iter()
            .map(|cmd| {
                cmd.args_iter()
                    .map(|arg| match arg {
                        ::redis::Arg::Simple(bytes) => bytes.to_vec(),
                        _ => b"<not simple>".to_vec(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn set_json_stores_the_payload_as_received_without_whitespace() {
        let set_json = action(Op::SetJson { value: None });
        for (payload, stored) in CORPUS {
            let cmds = commands(&set_json, payload);
            assert_eq!(cmds.len(), 1, "{payload}");
            assert_eq!(cmds[0][0], b"SET");
            assert_eq!(
                String::from_utf8_lossy(&cmds[0][2]),
                *stored,
                "payload {payload:?}"
            );
        }
    }

    #[test]
    fn hset_json_keeps_numbers_digits_and_nested_key_order() {
        let hset = action(Op::Hset {
            fields: HashFields::Json,
        });
        let cmds = commands(
            &hset,
            r#"{ "z" : 123456789012345678901234567890, "f" : 1.10, "neg" : -123456789012345678901,
                 "nested" : { "y" : [ 1.10 , -0.0 ], "x" : 18446744073709551616 }, "s" : "é" }"#,
        );
        let args: Vec<String> = cmds[0]
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "HSET",
                "k",
                "z",
                "123456789012345678901234567890",
                "f",
                "1.10",
                "neg",
                "-123456789012345678901",
                "nested",
                r#"{"y":[1.10,-0.0],"x":18446744073709551616}"#,
                "s",
                "é",
            ]
        );
    }
}
