//! The seed's methods (RouteMQ's "Redis Manager API"), each in two forms.
//!
//! - The **sentinel form** keeps the seed's names and return meanings: on error or when
//!   Redis is disabled it returns `None` / `false` / `0` / `-2`, never panics, and logs a
//!   rate-limited warning (never one per call).
//! - The **`try_` form** returns a [`Result`], for callers that must tell "missing" (`Ok(None)`)
//!   from "failed" (`Err`), or "NX/XX refused" (`Ok(false)`) from an error.
//!
//! Keys, fields and values accept anything `redis::ToRedisArgs` does (`&str`, `String`,
//! `&[u8]`, numbers…); `delete` takes one key or a slice of keys, `hset_many` a slice of
//! pairs or a map. Durations are `std::time::Duration`: a whole number of seconds is sent
//! with second precision (`EX`, `EXPIRE`), anything finer in milliseconds (`PX`, `PEXPIRE`),
//! rounded up so a key never expires early.
//!
//! JSON is compact `serde_json` output (which Python's `json.loads` reads), and reading
//! accepts what RouteMQ's `json.dumps` writes (`", "`/`": "` separators, `\uXXXX` escapes).
//! Python may also write `NaN`/`Infinity`, which are not JSON: those fail with
//! [`Error::Decode`].
//!
//! serde_json is built with `arbitrary_precision` (numbers keep their digits, which the
//! bridge daemon relies on): a number inside an `#[serde(untagged)]`, internally tagged or
//! `#[serde(flatten)]` type does not decode; give such a field the type `serde_json::Number`.

use std::time::Duration;

use ::redis::{Cmd, ToRedisArgs, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{Error, Result};
use super::manager::RedisManager;

/// Options of [`RedisManager::set`]: expiry (`ex`/`px`) and condition (`nx`/`xx`), as in the
/// seed. Setting `ex` after `px` (or `nx` after `xx`) replaces it: Redis accepts only one of
/// each.
///
/// ```
/// use std::time::Duration;
/// use routemq_redis::SetOptions;
/// let create_only_for_a_minute = SetOptions::new().ex(Duration::from_secs(60)).nx();
/// # let _ = create_only_for_a_minute;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetOptions {
    expiry: Option<Expiry>,
    condition: Option<Condition>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Ex(Duration),
    Px(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Condition {
    Nx,
    Xx,
}

impl SetOptions {
    /// No expiry, unconditional.
    pub fn new() -> Self {
        SetOptions::default()
    }

    /// Expire after `ttl` (the seed's `ex`, in seconds; a fraction is kept, sent as `PX`).
    pub fn ex(mut self, ttl: Duration) -> Self {
        self.expiry = Some(Expiry::Ex(ttl));
        self
    }

    /// Expire after `ttl` (the seed's `px`, in milliseconds).
    pub fn px(mut self, ttl: Duration) -> Self {
        self.expiry = Some(Expiry::Px(ttl));
        self
    }

    /// Only set if the key does not exist yet.
    pub fn nx(mut self) -> Self {
        self.condition = Some(Condition::Nx);
        self
    }

    /// Only set if the key already exists.
    pub fn xx(mut self) -> Self {
        self.condition = Some(Condition::Xx);
        self
    }

    fn write(&self, cmd: &mut Cmd) -> Result<()> {
        match self.expiry {
            Some(Expiry::Ex(ttl)) | Some(Expiry::Px(ttl)) if ttl.is_zero() => {
                return Err(Error::Invalid("SET expiry must be positive".into()));
            }
            Some(Expiry::Ex(ttl)) if ttl.subsec_nanos() == 0 => {
                cmd.arg("EX").arg(ttl.as_secs());
            }
            Some(Expiry::Ex(ttl)) | Some(Expiry::Px(ttl)) => {
                cmd.arg("PX").arg(millis_rounded_up(ttl));
            }
            None => {}
        }
        match self.condition {
            Some(Condition::Nx) => cmd.arg("NX"),
            Some(Condition::Xx) => cmd.arg("XX"),
            None => cmd,
        };
        Ok(())
    }
}

fn millis_rounded_up(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

impl RedisManager {
    fn or_sentinel<T>(&self, op: &str, result: Result<T>, sentinel: T) -> T {
        result.unwrap_or_else(|e| {
            self.warn_failed(op, &e);
            sentinel
        })
    }

    /// `GET`: the value, `Ok(None)` when the key is missing.
    pub async fn try_get<K: ToRedisArgs>(&self, key: K) -> Result<Option<String>> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(key);
        self.query(&cmd).await
    }

    /// `GET`: the value, `None` when missing or on error.
    ///
    /// ```no_run
    /// # async fn example(redis: &routemq_redis::RedisManager) {
    /// match redis.get("device:42:firmware").await {
    ///     Some(version) => println!("firmware {version}"),
    ///     // Missing, or Redis failed (logged): use `try_get` to tell them apart.
    ///     None => println!("unknown firmware"),
    /// }
    /// # }
    /// ```
    pub async fn get<K: ToRedisArgs>(&self, key: K) -> Option<String> {
        let result = self.try_get(key).await;
        self.or_sentinel("GET", result, None)
    }

    /// `SET` with options: `Ok(true)` when written, `Ok(false)` when NX/XX refused it.
    pub async fn try_set<K: ToRedisArgs, V: ToRedisArgs>(
        &self,
        key: K,
        value: V,
        options: SetOptions,
    ) -> Result<bool> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(key).arg(value);
        options.write(&mut cmd)?;
        match self.query::<Value>(&cmd).await? {
            Value::Okay | Value::SimpleString(_) => Ok(true),
            Value::Nil => Ok(false),
            other => Err(Error::Decode(format!("SET answered {other:?}"))),
        }
    }

    /// `SET` with options: true when written; false when NX/XX refused it or on error.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use routemq_redis::SetOptions;
    /// # async fn example(redis: &routemq_redis::RedisManager) {
    /// // Expires after a minute.
    /// redis.set("device:42:seen", "1", SetOptions::new().ex(Duration::from_secs(60))).await;
    /// // Only if absent: false when somebody set it first (or on error).
    /// let first = redis.set("device:42:owner", "gw1", SetOptions::new().nx()).await;
    /// # let _ = first;
    /// # }
    /// ```
    pub async fn set<K: ToRedisArgs, V: ToRedisArgs>(
        &self,
        key: K,
        value: V,
        options: SetOptions,
    ) -> bool {
        let result = self.try_set(key, value, options).await;
        self.or_sentinel("SET", result, false)
    }

    /// `DEL` of one key or many (`&["a", "b"]`): how many existed.
    pub async fn try_delete<K: ToRedisArgs>(&self, keys: K) -> Result<i64> {
        if keys.num_of_args() == 0 {
            return Ok(0);
        }
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(keys);
        self.query(&cmd).await
    }

    /// `DEL` of one key or many: how many existed; 0 on error.
    pub async fn delete<K: ToRedisArgs>(&self, keys: K) -> i64 {
        let result = self.try_delete(keys).await;
        self.or_sentinel("DEL", result, 0)
    }

    /// `EXISTS` of one key.
    pub async fn try_exists<K: ToRedisArgs>(&self, key: K) -> Result<bool> {
        let mut cmd = ::redis::cmd("EXISTS");
        cmd.arg(key);
        Ok(self.query::<i64>(&cmd).await? > 0)
    }

    /// `EXISTS` of one key; false on error.
    pub async fn exists<K: ToRedisArgs>(&self, key: K) -> bool {
        let result = self.try_exists(key).await;
        self.or_sentinel("EXISTS", result, false)
    }

    /// `EXPIRE` (or `PEXPIRE` for a fraction of a second): `Ok(false)` when the key is
    /// missing. A zero `ttl` deletes the key, as in Redis.
    pub async fn try_expire<K: ToRedisArgs>(&self, key: K, ttl: Duration) -> Result<bool> {
        let cmd = if ttl.subsec_nanos() == 0 {
            let mut cmd = ::redis::cmd("EXPIRE");
            cmd.arg(key).arg(ttl.as_secs());
            cmd
        } else {
            let mut cmd = ::redis::cmd("PEXPIRE");
            cmd.arg(key).arg(millis_rounded_up(ttl));
            cmd
        };
        Ok(self.query::<i64>(&cmd).await? == 1)
    }

    /// `EXPIRE`: true when the key exists and got the expiry; false otherwise or on error.
    pub async fn expire<K: ToRedisArgs>(&self, key: K, ttl: Duration) -> bool {
        let result = self.try_expire(key, ttl).await;
        self.or_sentinel("EXPIRE", result, false)
    }

    /// `TTL` in seconds: -1 when the key has no expiry, -2 when it is missing.
    pub async fn try_ttl<K: ToRedisArgs>(&self, key: K) -> Result<i64> {
        let mut cmd = ::redis::cmd("TTL");
        cmd.arg(key);
        self.query(&cmd).await
    }

    /// `TTL` in seconds: -1 no expiry, -2 missing — and -2 on error or when disabled.
    pub async fn ttl<K: ToRedisArgs>(&self, key: K) -> i64 {
        let result = self.try_ttl(key).await;
        self.or_sentinel("TTL", result, -2)
    }

    /// `INCRBY amount` (use 1 for the seed's default): the new value.
    pub async fn try_incr<K: ToRedisArgs>(&self, key: K, amount: i64) -> Result<i64> {
        let mut cmd = ::redis::cmd("INCRBY");
        cmd.arg(key).arg(amount);
        self.query(&cmd).await
    }

    /// `INCRBY amount`: the new value, `None` on error (e.g. the value is not an integer).
    pub async fn incr<K: ToRedisArgs>(&self, key: K, amount: i64) -> Option<i64> {
        let result = self.try_incr(key, amount).await;
        self.or_sentinel("INCRBY", result.map(Some), None)
    }

    /// `HSET` of one field: 1 when the field is new, 0 when it was updated.
    pub async fn try_hset<K: ToRedisArgs, F: ToRedisArgs, V: ToRedisArgs>(
        &self,
        key: K,
        field: F,
        value: V,
    ) -> Result<i64> {
        let mut cmd = ::redis::cmd("HSET");
        cmd.arg(key).arg(field).arg(value);
        self.query(&cmd).await
    }

    /// `HSET` of one field: fields added (0 or 1); 0 on error.
    pub async fn hset<K: ToRedisArgs, F: ToRedisArgs, V: ToRedisArgs>(
        &self,
        key: K,
        field: F,
        value: V,
    ) -> i64 {
        let result = self.try_hset(key, field, value).await;
        self.or_sentinel("HSET", result, 0)
    }

    /// `HSET` of a mapping (`&[("f", "v"), …]`, a `HashMap`, a `BTreeMap`): how many fields
    /// were added (updated ones do not count). An empty mapping writes nothing.
    pub async fn try_hset_many<K: ToRedisArgs, M: ToRedisArgs>(
        &self,
        key: K,
        mapping: M,
    ) -> Result<i64> {
        if mapping.num_of_args() == 0 {
            return Ok(0);
        }
        let mut cmd = ::redis::cmd("HSET");
        cmd.arg(key).arg(mapping);
        self.query(&cmd).await
    }

    /// `HSET` of a mapping: fields added; 0 on error.
    pub async fn hset_many<K: ToRedisArgs, M: ToRedisArgs>(&self, key: K, mapping: M) -> i64 {
        let result = self.try_hset_many(key, mapping).await;
        self.or_sentinel("HSET", result, 0)
    }

    /// `HGET`: the field's value, `Ok(None)` when the key or field is missing.
    pub async fn try_hget<K: ToRedisArgs, F: ToRedisArgs>(
        &self,
        key: K,
        field: F,
    ) -> Result<Option<String>> {
        let mut cmd = ::redis::cmd("HGET");
        cmd.arg(key).arg(field);
        self.query(&cmd).await
    }

    /// `HGET`: the field's value, `None` when missing or on error.
    pub async fn hget<K: ToRedisArgs, F: ToRedisArgs>(&self, key: K, field: F) -> Option<String> {
        let result = self.try_hget(key, field).await;
        self.or_sentinel("HGET", result, None)
    }

    /// `SET` of `value` as compact JSON, with the same options and answers as
    /// [`RedisManager::try_set`]. A value serde cannot write as JSON (a map with non-string
    /// keys…) is [`Error::Invalid`].
    pub async fn try_set_json<K: ToRedisArgs, T: Serialize + ?Sized>(
        &self,
        key: K,
        value: &T,
        options: SetOptions,
    ) -> Result<bool> {
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::Invalid(format!("value is not JSON-serializable: {e}")))?;
        self.try_set(key, json, options).await
    }

    /// `SET` of `value` as compact JSON: true when written; false when refused or on error.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use routemq_redis::SetOptions;
    /// # async fn example(redis: &routemq_redis::RedisManager) {
    /// let reading = serde_json::json!({"device": "42", "temp": 21.5});
    /// let ttl = SetOptions::new().ex(Duration::from_secs(3600));
    /// redis.set_json("device:42:last", &reading, ttl).await;
    /// # }
    /// ```
    pub async fn set_json<K: ToRedisArgs, T: Serialize + ?Sized>(
        &self,
        key: K,
        value: &T,
        options: SetOptions,
    ) -> bool {
        let result = self.try_set_json(key, value, options).await;
        self.or_sentinel("SET", result, false)
    }

    /// `GET` read as JSON into `T`: `Ok(None)` when missing, [`Error::Decode`] when the value
    /// is not JSON of that shape.
    pub async fn try_get_json<K: ToRedisArgs, T: DeserializeOwned>(
        &self,
        key: K,
    ) -> Result<Option<T>> {
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(key);
        let Some(bytes) = self.query::<Option<Vec<u8>>>(&cmd).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Decode(format!("value is not the expected JSON: {e}")))
    }

    /// `GET` read as JSON into `T`: `None` when missing, not JSON of that shape, or on error.
    ///
    /// ```no_run
    /// #[derive(serde::Deserialize)]
    /// struct Reading {
    ///     temp: f64,
    /// }
    /// # async fn example(redis: &routemq_redis::RedisManager) {
    /// if let Some(reading) = redis.get_json::<_, Reading>("device:42:last").await {
    ///     println!("last temperature {}", reading.temp);
    /// }
    /// # }
    /// ```
    pub async fn get_json<K: ToRedisArgs, T: DeserializeOwned>(&self, key: K) -> Option<T> {
        let result = self.try_get_json(key).await;
        self.or_sentinel("GET", result, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(options: SetOptions) -> Result<Vec<String>> {
        let mut cmd = ::redis::cmd("SET");
        options.write(&mut cmd)?;
        Ok(cmd
            .args_iter()
            .filter_map(|a| match a {
                ::redis::Arg::Simple(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                _ => None,
            })
            .collect())
    }

    #[test]
    fn whole_seconds_go_as_ex_and_fractions_as_px_rounded_up() {
        let secs = args(SetOptions::new().ex(Duration::from_secs(60))).expect("valid");
        assert_eq!(secs, ["SET", "EX", "60"]);
        let frac = args(SetOptions::new().ex(Duration::from_micros(1_500_001))).expect("valid");
        assert_eq!(frac, ["SET", "PX", "1501"]);
        let px = args(SetOptions::new().px(Duration::from_millis(250)).nx()).expect("valid");
        assert_eq!(px, ["SET", "PX", "250", "NX"]);
    }

    #[test]
    fn a_later_option_replaces_its_rival_and_zero_expiry_is_invalid() {
        let opts = SetOptions::new()
            .px(Duration::from_millis(5))
            .ex(Duration::from_secs(1))
            .nx()
            .xx();
        assert_eq!(args(opts).expect("valid"), ["SET", "EX", "1", "XX"]);
        assert!(matches!(
            args(SetOptions::new().ex(Duration::ZERO)),
            Err(Error::Invalid(_))
        ));
    }
}
