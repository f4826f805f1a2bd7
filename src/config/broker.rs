//! The broker's address as the config names it: `mqtt://host[:port]` or `mqtts://…`.

use super::redact_url;

/// Where the broker is: `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]`
/// (TLS, default 8883).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    pub tls: bool,
    /// Without brackets, also for IPv6 addresses.
    pub host: String,
    pub port: u16,
}

impl Default for BrokerAddress {
    fn default() -> Self {
        BrokerAddress {
            tls: false,
            host: "127.0.0.1".to_string(),
            port: 1883,
        }
    }
}

impl BrokerAddress {
    /// Messages name the URL with its userinfo redacted: a URL with a password is refused,
    /// and the refusal must not print the password (spec §8).
    pub fn parse(url: &str) -> Result<BrokerAddress, String> {
        let shown = redact_url(url);
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(format!(
                "expected a URL starting with mqtt:// or mqtts://, found {shown:?}"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(format!(
                "credentials do not go in the URL: set mqtt.username and mqtt.password (or \
                 password_file), found {shown:?}"
            ));
        }
        if rest.contains(['/', '?', '#']) {
            return Err(format!(
                "expected mqtt[s]://host[:port] without path or query, found {shown:?}"
            ));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in {shown:?}"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("unexpected {after:?} after ']' in {shown:?}")),
                },
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in {shown:?}"));
        }
        let port = match port {
            None if tls => 8883,
            None => 1883,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(format!(
                        "expected a port number 1..=65535, found {p:?} in {shown:?}"
                    ))
                }
            },
        };
        Ok(BrokerAddress {
            tls,
            host: host.to_string(),
            port,
        })
    }

    pub fn to_url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}
