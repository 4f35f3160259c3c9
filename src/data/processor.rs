//! The Qwen3-VL image processor: smart_resize, uint8 bicubic resize, normalisation with
//! mean = std = 0.5 and patchification into [num_patches, 3·2·16·16] rows in merge-block order.

use std::path::Path;

use super::image::load_rgb;
use super::resize::{resize_bicubic, smart_resize, Rgb8};
use crate::error::{Error, Result};

/// Image processor settings (defaults = Qwen3-VL's `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    /// Smallest area after resizing (HF: 65,536).
    pub min_pixels: usize,
    /// Largest area after resizing (HF: 16,777,216).
    pub max_pixels: usize,
    /// Explicit target (height, width), itself passed through `smart_resize` (the reference
    /// workflow's 280x280 becomes 288x288).
    pub resize: Option<(usize, usize)>,
    /// Patch side (16).
    pub patch_size: usize,
    /// Frames per temporal patch (2; a still image is repeated).
    pub temporal_patch_size: usize,
    /// Patches merged per side (2).
    pub merge_size: usize,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            resize: None,
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
        }
    }
}

/// One preprocessed image.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// [t·h·w, 3·T·P·P] row-major, f32.
    pub pixel_values: Vec<f32>,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Number of `<|image_pad|>` tokens this image takes: t·h·w / merge².
    pub fn num_tokens(&self, merge: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge * merge)
    }
}

impl ImageOptions {
    /// Values per patch row.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The size an image of `height` x `width` is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let factor = self.patch_size * self.merge_size;
        let (h, w) = self.resize.unwrap_or((height, width));
        smart_resize(h, w, factor, self.min_pixels, self.max_pixels)
    }

    /// The resized size of `img`, refusing images smaller than one patch.
    fn checked_target(&self, img: &Rgb8, what: &str) -> Result<(usize, usize)> {
        if img.width < self.patch_size || img.height < self.patch_size {
            return Err(Error::Input(format!(
                "{what}: image is {}x{}, smaller than one {}x{} patch",
                img.width, img.height, self.patch_size, self.patch_size
            )));
        }
        self.target_size(img.height, img.width)
            .map_err(|e| Error::Input(format!("{what}: {e}")))
    }

    /// Preprocesses a decoded image; `what` names it in errors.
    pub fn process(&self, img: &Rgb8, what: &str) -> Result<ProcessedImage> {
        let (h, w) = self.checked_target(img, what)?;
        Ok(self.patchify(&resize_bicubic(img, h, w)))
    }

    /// Image tokens (t·h·w / merge²) `img` would take, without resizing it.
    pub fn process_dims(&self, img: &Rgb8, what: &str) -> Result<usize> {
        let (h, w) = self.checked_target(img, what)?;
        Ok(h * w / (self.patch_size * self.merge_size).pow(2))
    }

    /// Reads and preprocesses the image file at `path`.
    pub fn process_file(&self, path: &Path) -> Result<ProcessedImage> {
        let img = load_rgb(path)?;
        self.process(&img, &path.display().to_string())
    }

    /// Normalises `(u8 − 127.5) / 127.5` and lays the patches out in merge-block order, each
    /// row (channel, frame, py, px) with the image repeated over the temporal patch.
    pub fn patchify(&self, img: &Rgb8) -> ProcessedImage {
        let (p, tp, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (gh, gw) = (img.height / p, img.width / p);
        let row_len = self.patch_dim();
        let mut out = Vec::with_capacity(gh * gw * row_len);
        // (v − 127.5) / 127.5 for every level, computed once.
        let lut: [f32; 256] = std::array::from_fn(|v| (v as f32 - 127.5) / 127.5);
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (r, c) = (bh * m + mh, bw * m + mw);
                        for ch in 0..3 {
                            for _ in 0..tp {
                                for py in 0..p {
                                    let y = r * p + py;
                                    let base = (y * img.width + c * p) * 3;
                                    let line = &img.data[base..base + 3 * p];
                                    out.extend(line.chunks_exact(3).map(|px| lut[px[ch] as usize]));
                                }
                            }
                        }
                    }
                }
            }
        }
        ProcessedImage {
            pixel_values: out,
            grid_thw: [1, gh, gw],
        }
    }
}
