//! Decoding image files to 8-bit RGB: JPEG, PNG, WebP; EXIF orientation applied; grayscale,
//! alpha (dropped, as PIL's `convert("RGB")` does) and CMYK converted to RGB.

use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader};

use super::resize::Rgb8;
use crate::error::{Error, Result};

/// Reads `path` into RGB8 with its EXIF orientation applied.
pub fn load_rgb(path: &Path) -> Result<Rgb8> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            hint: "The image does not exist.".into(),
        });
    }
    let bad = |e: String| Error::Input(format!("{}: cannot decode image: {e}", path.display()));
    let reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let mut decoder = reader.into_decoder().map_err(|e| bad(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| bad(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| bad(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

/// Decodes an in-memory encoded image (any supported format), EXIF orientation applied.
pub fn decode_rgb(bytes: &[u8], what: &str) -> Result<Rgb8> {
    let bad = |e: String| Error::Input(format!("{what}: cannot decode image: {e}"));
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    let mut decoder = reader.into_decoder().map_err(|e| bad(e.to_string()))?;
    let orientation = decoder.orientation().map_err(|e| bad(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| bad(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

fn to_rgb8(img: DynamicImage) -> Rgb8 {
    let rgb = img.into_rgb8();
    Rgb8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    }
}
