//! `preprocess`: one image file -> `pixel_values` [N, 1536] (f32) and `image_grid_thw` [1, 3].

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::tensor_file::write_tensors;
use crate::checkpoint::HostTensor;
use crate::data::{ImageOptions, ProcessedImage};
use crate::error::{Error, Result};

/// Parses `HxW` (e.g. `280x280`) into (height, width).
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::Argument {
        arg: "--resize".into(),
        message: format!("expected HEIGHTxWIDTH such as 280x280, found `{s}`"),
    };
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    if h == 0 || w == 0 {
        return Err(bad());
    }
    Ok((h, w))
}

/// Preprocesses `image` and writes the tensors to `out` (temp file + rename).
pub fn preprocess_to_file(image: &Path, opts: &ImageOptions, out: &Path) -> Result<ProcessedImage> {
    if opts.min_pixels > opts.max_pixels {
        return Err(Error::Argument {
            arg: "--min-pixels".into(),
            message: format!(
                "{} exceeds --max-pixels {}",
                opts.min_pixels, opts.max_pixels
            ),
        });
    }
    let p = opts.process_file(image)?;
    let rows = p.pixel_values.len() / opts.patch_dim();
    let mut t = BTreeMap::new();
    t.insert(
        "pixel_values".to_string(),
        HostTensor::F32(p.pixel_values.clone(), vec![rows, opts.patch_dim()]),
    );
    t.insert(
        "image_grid_thw".to_string(),
        HostTensor::I64(p.grid_thw.iter().map(|&v| v as i64).collect(), vec![1, 3]),
    );
    write_tensors(out, &t)?;
    Ok(p)
}
