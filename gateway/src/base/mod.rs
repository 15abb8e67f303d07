//! The small core every part of the gateway may import, and which imports none of them: the
//! point model, topic names and templates, metric primitives.

pub mod metrics;
pub mod point;
pub mod topic;
