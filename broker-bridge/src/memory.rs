//! The in-process memory bus (placeholder).
