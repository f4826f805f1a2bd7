//! Outcomes (spec §5.3): every message ends in exactly one per matched route.

use std::fmt;

/// Why a message was refused as `invalid` or `failed`: the dead letter's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    InvalidUtf8,
    PayloadTooLarge,
    InvalidParam,
    MissingField,
    RedisError,
    /// MQTT 5: the Message Expiry Interval passed before the message could be written.
    Expired,
    /// A bug in the bridge while handling this message (a panic): the message is
    /// dead-lettered and the next one goes on.
    InternalError,
    /// Dropped from the full local spool (`spool.on_full = "drop_oldest"`, spec §6.2).
    SpoolFull,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::InvalidParam => "invalid_param",
            Reason::MissingField => "missing_field",
            Reason::RedisError => "redis_error",
            Reason::Expired => "expired",
            Reason::InternalError => "internal_error",
            Reason::SpoolFull => "spool_full",
        }
    }

    /// The reason named `name` (as [`Reason::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Reason> {
        [
            Reason::InvalidJson,
            Reason::InvalidUtf8,
            Reason::PayloadTooLarge,
            Reason::InvalidParam,
            Reason::MissingField,
            Reason::RedisError,
            Reason::InternalError,
            Reason::SpoolFull,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }

    pub fn from_render(e: &crate::template::RenderError) -> Reason {
        match e.reason() {
            "invalid_utf8" => Reason::InvalidUtf8,
            "missing_field" => Reason::MissingField,
            _ => Reason::InvalidParam,
        }
    }
}

/// How one route finished with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    RateLimited,
    Duplicate,
    Unauthorized,
    /// Bad payload, param or template; dead-lettered.
    Invalid {
        reason: Reason,
        detail: String,
    },
    /// A permanent Redis error (e.g. WRONGTYPE); dead-lettered.
    Failed {
        detail: String,
    },
    /// A QoS 0 message beyond `max_inflight`.
    Overflow,
    /// A bug of ours (a panic) while handling the message on this route: counted as
    /// `failed`, dead-lettered as `internal_error`.
    Internal {
        detail: String,
    },
}

impl Outcome {
    pub fn invalid(reason: Reason, detail: impl Into<String>) -> Outcome {
        Outcome::Invalid {
            reason,
            detail: detail.into(),
        }
    }

    /// A template that could not be rendered for this message (`invalid`).
    pub fn from_render(e: &crate::template::RenderError) -> Outcome {
        Outcome::invalid(Reason::from_render(e), e.to_string())
    }

    /// The `outcome` label of `messages_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::RateLimited => "rate_limited",
            Outcome::Duplicate => "duplicate",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Invalid { .. } => "invalid",
            Outcome::Failed { .. } | Outcome::Internal { .. } => "failed",
            Outcome::Overflow => "overflow",
        }
    }

    /// The dead-letter reason and detail, for the outcomes that go there.
    pub fn dead_letter(&self) -> Option<(Reason, &str)> {
        match self {
            Outcome::Invalid { reason, detail } => Some((*reason, detail)),
            Outcome::Failed { detail } => Some((Reason::RedisError, detail)),
            Outcome::Internal { detail } => Some((Reason::InternalError, detail)),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dead_letter() {
            Some((reason, detail)) => write!(f, "{} ({}: {detail})", self.label(), reason.as_str()),
            None => f.write_str(self.label()),
        }
    }
}
