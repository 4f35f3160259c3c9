//! The caption data pipeline: dataset sources, Qwen3-VL image preprocessing, the chat
//! template with labels, and batching.
//!
//! * [`image`]: decoding files to RGB8 (EXIF orientation, grayscale/alpha/CMYK).
//! * [`resize`]: `smart_resize` and torchvision's uint8 antialiased bicubic resize.
//! * [`processor`]: normalisation and patchification (`pixel_values`, `image_grid_thw`).

pub mod batch;
pub mod image;
pub mod processor;
pub mod resize;
pub mod sources;
pub mod synthetic;
pub mod template;
pub mod tokenizer;

pub use processor::{ImageOptions, ProcessedImage};
