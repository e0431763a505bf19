//! Weir's dispatcher: runs WebAssembly functions on events from brokers.
//!
//! Data flows one way: broker → transport (`weir-broker-bridge`) → [`runner`] → function
//! ([`engine`], [`pool`]) → outputs / dead letters ([`chain`], [`deadletter`]) → ack.

pub mod chain;
pub mod config;
pub mod deadletter;
pub mod demo;
pub mod engine;
pub mod http;
pub mod ingress;
pub mod pool;
pub mod redrive;
pub mod retry;
pub mod runner;
pub mod runtime;
pub mod scaling;
pub mod status;
pub mod telemetry;
