//! NATS core and JetStream transport (in progress).
