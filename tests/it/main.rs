//! Integration tests, in one binary so the generic model code is compiled once.

mod adapters;
mod batching;
mod cli;
mod common;
mod datasets;
mod gemv_emulation;
mod generate;
mod images;
mod loading;
mod metrics;
mod nf4;
mod parity;
mod template;
mod train;
