//! Subcommands, generic over the backend; `main.rs` parses arguments and picks the backend.

pub mod data;
pub mod forward;
pub mod info;
pub mod preprocess;
