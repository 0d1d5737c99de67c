//! Placeholder until the owner registry lands.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Attribution {}
