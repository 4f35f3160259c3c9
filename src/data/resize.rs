//! `smart_resize` and the uint8 antialiased bicubic resize of torchvision (PyTorch's CPU
//! kernel), reproduced bit for bit: separable, horizontal pass first, int16 fixed-point weights.

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows of interleaved R, G, B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes, row-major.
    pub data: Vec<u8>,
}

/// HF's `smart_resize`: the size closest to (h, w) whose sides are multiples of `factor`
/// and whose area lies in [min_pixels, max_pixels]; Python's round-half-to-even rounding.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::Input(format!(
            "image size {width}x{height} is empty"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Input(format!(
            "image {width}x{height}: aspect ratio {:.1} exceeds 200",
            h.max(w) / h.min(w)
        )));
    }
    let mut hb = (h / f).round_ties_even() * f;
    let mut wb = (w / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        hb = f.max((h / beta / f).floor() * f);
        wb = f.max((w / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        hb = (h * beta / f).ceil() * f;
        wb = (w * beta / f).ceil() * f;
    }
    Ok((hb as usize, wb as usize))
}

/// Keys cubic kernel with a = −0.5 (PyTorch's antialias bicubic filter).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: for each output index, the first input index and
/// `taps` int16 weights (zero-padded), scaled by 2^precision.
struct AxisTaps {
    start: Vec<usize>,
    len: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
    precision: u32,
}

fn axis_taps(input: usize, output: usize) -> AxisTaps {
    let scale = input as f64 / output as f64;
    let (support, inv) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    let taps = 2 * support.ceil() as usize + 1;
    let mut start = Vec::with_capacity(output);
    let mut len = Vec::with_capacity(output);
    let mut real = vec![0f64; output * taps];
    for i in 0..output {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
        let xmax = ((center + support + 0.5).trunc() as i64).min(input as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(taps);
        let row = &mut real[i * taps..i * taps + n];
        let mut total = 0.0;
        for (j, w) in row.iter_mut().enumerate() {
            *w = cubic((j as f64 + xmin as f64 - center + 0.5) * inv);
            total += *w;
        }
        if total != 0.0 {
            row.iter_mut().for_each(|w| *w /= total);
        }
        start.push(xmin);
        len.push(n);
    }
    let wmax = real.iter().cloned().fold(0f64, f64::max);
    let mut precision = 0u32;
    while precision < 22 && ((0.5 + wmax * (1u64 << (precision + 1)) as f64) as i64) < 32768 {
        precision += 1;
    }
    let unit = (1u64 << precision) as f64;
    let weights = real
        .iter()
        .map(|&w| {
            let v = w * unit;
            (if v < 0.0 { v - 0.5 } else { v + 0.5 }).trunc() as i32
        })
        .collect();
    AxisTaps {
        start,
        len,
        taps,
        weights,
        precision,
    }
}

fn clamp_shift(acc: i32, precision: u32) -> u8 {
    (acc >> precision).clamp(0, 255) as u8
}

fn resize_width(img: &Rgb8, out_w: usize) -> Rgb8 {
    let t = axis_taps(img.width, out_w);
    let round = 1i32 << (t.precision - 1);
    let mut data = vec![0u8; img.height * out_w * 3];
    for y in 0..img.height {
        let src = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let dst = &mut data[y * out_w * 3..(y + 1) * out_w * 3];
        for x in 0..out_w {
            let w = &t.weights[x * t.taps..x * t.taps + t.len[x]];
            let px = &src[t.start[x] * 3..(t.start[x] + w.len()) * 3];
            let (mut r, mut g, mut b) = (round, round, round);
            for (&wj, p) in w.iter().zip(px.chunks_exact(3)) {
                r += wj * p[0] as i32;
                g += wj * p[1] as i32;
                b += wj * p[2] as i32;
            }
            dst[x * 3] = clamp_shift(r, t.precision);
            dst[x * 3 + 1] = clamp_shift(g, t.precision);
            dst[x * 3 + 2] = clamp_shift(b, t.precision);
        }
    }
    Rgb8 {
        width: out_w,
        height: img.height,
        data,
    }
}

fn resize_height(img: &Rgb8, out_h: usize) -> Rgb8 {
    let t = axis_taps(img.height, out_h);
    let round = 1i32 << (t.precision - 1);
    let row = img.width * 3;
    let mut data = vec![0u8; out_h * row];
    let mut acc = vec![0i32; row];
    for y in 0..out_h {
        acc.iter_mut().for_each(|a| *a = round);
        let w = &t.weights[y * t.taps..y * t.taps + t.len[y]];
        for (j, &wj) in w.iter().enumerate() {
            let src = &img.data[(t.start[y] + j) * row..(t.start[y] + j + 1) * row];
            for (a, &s) in acc.iter_mut().zip(src) {
                *a += wj * s as i32;
            }
        }
        for (d, &a) in data[y * row..(y + 1) * row].iter_mut().zip(&acc) {
            *d = clamp_shift(a, t.precision);
        }
    }
    Rgb8 {
        width: img.width,
        height: out_h,
        data,
    }
}

/// Resizes like `torchvision.transforms.v2.functional.resize(uint8, [h, w], BICUBIC,
/// antialias=True)` on the CPU: width pass, then height pass, each skipped when unchanged.
pub fn resize_bicubic(img: &Rgb8, out_h: usize, out_w: usize) -> Rgb8 {
    let mut cur = std::borrow::Cow::Borrowed(img);
    if out_w != img.width {
        cur = std::borrow::Cow::Owned(resize_width(&cur, out_w));
    }
    if out_h != img.height {
        cur = std::borrow::Cow::Owned(resize_height(&cur, out_h));
    }
    cur.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_hf_examples() {
        let r = |h, w| smart_resize(h, w, 32, 65536, 16_777_216).unwrap();
        assert_eq!(r(480, 640), (480, 640));
        assert_eq!(r(48, 80), (224, 352));
        assert_eq!(r(100, 100), (256, 256));
        assert_eq!(r(1080, 1920), (1088, 1920));
        assert_eq!(r(4000, 6000), (3328, 4992));
        assert_eq!(r(250, 4000), (256, 4000));
        assert_eq!(r(37, 1000), (64, 1344));
        assert_eq!(r(272, 1024), (256, 1024)); // 8.5 rounds to even
        assert_eq!(r(280, 280), (288, 288)); // the reference workflow's 280x280
        assert!(smart_resize(10, 3000, 32, 65536, 16_777_216).is_err());
    }

    #[test]
    fn identity_and_constant_images() {
        let img = Rgb8 {
            width: 5,
            height: 3,
            data: (0..45).map(|v| (v * 5) as u8).collect(),
        };
        assert_eq!(resize_bicubic(&img, 3, 5), img);
        let flat = Rgb8 {
            width: 7,
            height: 9,
            data: vec![77; 7 * 9 * 3],
        };
        let out = resize_bicubic(&flat, 4, 13);
        assert!(out.data.iter().all(|&v| v == 77));
    }
}
