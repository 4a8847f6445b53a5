//! Operators (placeholder)
