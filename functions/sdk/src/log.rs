//! Log lines through the host's `log` import. The host attributes each line to the function and
//! the event being handled and writes it with its own logger, so a message needs no prefix.
//! Each call takes anything printable: `log::info("ready")`,
//! `log::warn(format_args!("amount {amount} looks odd"))`.
//!
//! Writing to stdout/stderr also ends up in the host's logs, without the level.

use core::fmt::Display;

use crate::bindings::weir::function::host::{self, Level};

fn emit(level: Level, message: impl Display) {
    host::log(level, &message.to_string());
}

/// A trace-level line.
pub fn trace(message: impl Display) {
    emit(Level::Trace, message);
}

/// A debug-level line.
pub fn debug(message: impl Display) {
    emit(Level::Debug, message);
}

/// An info-level line.
pub fn info(message: impl Display) {
    emit(Level::Info, message);
}

/// A warn-level line.
pub fn warn(message: impl Display) {
    emit(Level::Warn, message);
}

/// An error-level line.
pub fn error(message: impl Display) {
    emit(Level::Error, message);
}
