//! Subcommands, generic over the backend; `main.rs` picks the backend and dispatches.
//!
//! * [`args`]: the command line (clap): every subcommand and its arguments.

pub mod args;
pub mod caption;
pub mod chat;
pub mod data;
pub mod eval;
pub mod forward;
pub mod info;
pub mod preprocess;
