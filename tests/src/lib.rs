//! Test support for Weir's end-to-end tests: real servers on free loopback ports, stopped on drop.
//!
//! Nothing here mocks a broker: `NatsServer` runs a real `nats-server -js`, `KafkaBroker` a real
//! Kafka-protocol broker (Tansu). Tests that need them fail loudly when a binary is missing, because
//! `make test` installs them first.

pub mod bench;
pub mod cpu;
pub mod kafka_broker;
pub mod nats_server;
pub mod ports;
pub mod process;
pub mod scenario;
pub mod tls;
pub mod weir;
