//! Tansu harness (in progress).
