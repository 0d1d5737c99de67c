//! Following packets: where a change happened (segments) and flows (request and reply joined).
pub mod flows;
pub mod segment;
