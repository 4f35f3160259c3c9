//! Training: the pieces that exist so far.
//!
//! * [`schedule`]: warmup + cosine/linear learning-rate schedule in optimizer steps.

pub mod schedule;
