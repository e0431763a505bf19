//! Weir's dispatcher.
