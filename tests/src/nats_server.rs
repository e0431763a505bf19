//! nats-server harness (in progress).
