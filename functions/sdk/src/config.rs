//! The function's configuration values, set per function in `weir.toml` (the serverless
//! "environment variables"). Each read is a host call that copies the value into the guest.
//! Values are fixed for an instance's life: Weir reads `weir.toml` once at start and has no
//! reload, and an instance never serves another function. So a value used on every event may
//! be read once and kept in a static (a `std::sync::OnceLock`), as the `echo` test function
//! does; a changed `weir.toml` takes effect when Weir restarts.

use core::str::FromStr;

use crate::bindings::weir::function::host;

/// A config value that is set but does not parse as the type the function needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config value `{key}` = {value:?} is not a valid {expected}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub expected: &'static str,
    pub reason: String,
}

/// The value of `key`, or `None` when the function's config does not set it.
pub fn get(key: &str) -> Option<String> {
    host::config_get(key)
}

/// The value of `key`, or `default` when unset.
pub fn get_or(key: &str, default: &str) -> String {
    get(key).unwrap_or_else(|| default.to_owned())
}

/// The value of `key` parsed as `T` (surrounding whitespace ignored), or `default` when unset.
/// A value that is set but does not parse is an error, never silently the default.
pub fn parse_or<T>(key: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: core::fmt::Display,
{
    match get(key) {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|error: T::Err| ConfigError {
            key: key.to_owned(),
            expected: core::any::type_name::<T>(),
            reason: error.to_string(),
            value,
        }),
    }
}
