//! 3-axis (t, h, w) position ids for M-RoPE, with HF `get_rope_index` semantics.
//!
//! Text tokens advance all three axes together. A run of image placeholders takes the next
//! grid (t, h, w) and gives its merged tokens (cur + ti, cur + row, cur + col); afterwards the
//! position jumps by max(h', w'), not by the number of tokens. Padded positions get 0.

use crate::error::{Error, Result};

/// Position ids [3, B, T] (row-major) and the per-row rope delta used for decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionIds {
    /// Rows in the batch.
    pub batch: usize,
    /// Sequence length.
    pub len: usize,
    /// [3, B, T] flattened.
    pub data: Vec<i64>,
    /// max(position) + 1 − (number of unpadded tokens), per row.
    pub deltas: Vec<i64>,
}

impl PositionIds {
    /// Position on `axis` (0 = t, 1 = h, 2 = w) of token `t` in row `b`.
    pub fn get(&self, axis: usize, b: usize, t: usize) -> i64 {
        self.data[(axis * self.batch + b) * self.len + t]
    }

    fn set(&mut self, axis: usize, b: usize, t: usize, v: i64) {
        self.data[(axis * self.batch + b) * self.len + t] = v;
    }
}

/// The token ids and sizes `rope_index` needs to recognise visual runs.
#[derive(Debug, Clone, Copy)]
pub struct VisualTokens {
    /// `<|image_pad|>` id.
    pub image_token_id: i64,
    /// `<|video_pad|>` id.
    pub video_token_id: i64,
    /// Patches merged per side into one token.
    pub spatial_merge_size: usize,
}

/// Computes M-RoPE position ids for `input_ids` [B, T] (row-major).
///
/// `image_grids` / `video_grids` list the (t, h, w) patch grids in order of appearance over the
/// whole batch (row 0 first). A video grid (t, h, w) counts as t frames of (1, h, w).
pub fn rope_index(
    input_ids: &[i64],
    batch: usize,
    len: usize,
    attention_mask: Option<&[i64]>,
    image_grids: &[[usize; 3]],
    video_grids: &[[usize; 3]],
    tokens: VisualTokens,
) -> Result<PositionIds> {
    let m = tokens.spatial_merge_size;
    let mut out = PositionIds {
        batch,
        len,
        data: vec![0; 3 * batch * len],
        deltas: vec![0; batch],
    };
    let frames: Vec<[usize; 3]> = video_grids
        .iter()
        .flat_map(|g| std::iter::repeat_n([1, g[1], g[2]], g[0]))
        .collect();
    let mut next_image = image_grids.iter().enumerate();
    let mut next_frame = frames.iter().enumerate();
    for b in 0..batch {
        let kept: Vec<usize> = (0..len)
            .filter(|&t| attention_mask.is_none_or(|mask| mask[b * len + t] != 0))
            .collect();
        let kind = |t: usize| {
            let id = input_ids[b * len + t];
            if id == tokens.image_token_id {
                1
            } else if id == tokens.video_token_id {
                2
            } else {
                0
            }
        };
        let mut cur: i64 = 0;
        let mut max_pos: i64 = -1;
        let mut i = 0;
        while i < kept.len() {
            let k = kind(kept[i]);
            let mut end = i;
            while end < kept.len() && kind(kept[end]) == k {
                end += 1;
            }
            let run = &kept[i..end];
            if k == 0 {
                for (n, &t) in run.iter().enumerate() {
                    let p = cur + n as i64;
                    for axis in 0..3 {
                        out.set(axis, b, t, p);
                    }
                    max_pos = max_pos.max(p);
                }
                cur += run.len() as i64;
            } else {
                let what = if k == 1 { "image" } else { "video frame" };
                let (idx, grid) =
                    if k == 1 {
                        next_image.next()
                    } else {
                        next_frame.next()
                    }
                    .ok_or_else(|| {
                        Error::Input(format!(
                        "row {b}: a run of {} {what} tokens at position {} has no grid left in \
                         {}_grid_thw ({} given)",
                        run.len(),
                        kept[i],
                        if k == 1 { "image" } else { "video" },
                        if k == 1 { image_grids.len() } else { frames.len() }
                    ))
                    })?;
                let [gt, gh, gw] = *grid;
                if gh % m != 0 || gw % m != 0 {
                    return Err(Error::Input(format!(
                        "{what} {idx}: grid ({gt}, {gh}, {gw}) is not divisible by the merge \
                         size {m}"
                    )));
                }
                let (hh, ww) = (gh / m, gw / m);
                if run.len() != gt * hh * ww {
                    return Err(Error::Input(format!(
                        "row {b}: {what} {idx} has {} placeholder tokens but its grid ({gt}, {gh}, \
                         {gw}) gives {} merged tokens",
                        run.len(),
                        gt * hh * ww
                    )));
                }
                for (n, &t) in run.iter().enumerate() {
                    let (ti, r, c) = (n / (hh * ww), (n / ww) % hh, n % ww);
                    let p = [cur + ti as i64, cur + r as i64, cur + c as i64];
                    for (axis, v) in p.into_iter().enumerate() {
                        out.set(axis, b, t, v);
                        max_pos = max_pos.max(v);
                    }
                }
                cur += hh.max(ww) as i64;
            }
            i = end;
        }
        out.deltas[b] = if kept.is_empty() {
            0
        } else {
            max_pos + 1 - kept.len() as i64
        };
    }
    let used_images = next_image.next().map_or(image_grids.len(), |(i, _)| i);
    if used_images != image_grids.len() {
        return Err(Error::Input(format!(
            "image_grid_thw lists {} images but input_ids hold only {used_images} runs of image \
             tokens",
            image_grids.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOK: VisualTokens = VisualTokens {
        image_token_id: 9,
        video_token_id: 8,
        spatial_merge_size: 2,
    };

    #[test]
    fn spec_example_jumps_by_max_side() {
        // <|im_start|> user \n <|vision_start|> [300 image tokens, h'=15, w'=20] <|vision_end|> x
        let mut ids = vec![1, 2, 3, 4];
        ids.extend(std::iter::repeat_n(9, 300));
        ids.extend([5, 6]);
        let p = rope_index(&ids, 1, ids.len(), None, &[[1, 30, 40]], &[], TOK).unwrap();
        assert_eq!(p.get(0, 0, 4), 4);
        assert_eq!(p.get(1, 0, 4 + 299), 18);
        assert_eq!(p.get(2, 0, 4 + 299), 23);
        assert_eq!(p.get(0, 0, 304), 24);
        assert_eq!(p.get(2, 0, 305), 25);
        assert_eq!(p.deltas[0], -280); // max 25 + 1 − 306 tokens
    }

    #[test]
    fn left_padding_gets_zero_and_counts_unpadded_tokens() {
        let ids = [0, 0, 1, 9, 9, 2];
        let mask = [0, 0, 1, 1, 1, 1];
        let p = rope_index(&ids, 1, 6, Some(&mask), &[[1, 2, 4]], &[], TOK).unwrap();
        let row = |a| (0..6).map(|t| p.get(a, 0, t)).collect::<Vec<_>>();
        assert_eq!(row(0), vec![0, 0, 0, 1, 1, 3]);
        assert_eq!(row(1), vec![0, 0, 0, 1, 1, 3]);
        assert_eq!(row(2), vec![0, 0, 0, 1, 2, 3]);
        assert_eq!(p.deltas, vec![0]);
    }

    #[test]
    fn mismatched_grids_are_errors() {
        let ids = [1, 9, 9, 2];
        assert!(rope_index(&ids, 1, 4, None, &[], &[], TOK).is_err());
        assert!(rope_index(&ids, 1, 4, None, &[[1, 4, 4]], &[], TOK).is_err());
        assert!(rope_index(&ids, 1, 4, None, &[[1, 2, 4], [1, 2, 4]], &[], TOK).is_err());
    }
}
