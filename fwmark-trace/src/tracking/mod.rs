//! Following packets: where a change happened (segments).
pub mod segment;
