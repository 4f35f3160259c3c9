//! COCO caption metrics as pycocoevalcap computes them (spec §D): corpus-level BLEU-1..4 with
//! the closest reference length, ROUGE-L (LCS, beta 1.2, averaged over images) and CIDEr-D
//! (1- to 4-grams, tf-idf with document frequencies from the evaluated references, clipping,
//! Gaussian length penalty with sigma 6, x10). Inputs are already tokenised
//! ([`super::tokenize::ptb_tokenize`]); each image has one candidate and >= 1 references.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// One image: the candidate caption and the reference captions (tokenised).
#[derive(Debug, Clone)]
pub struct Scored<'a> {
    /// Generated caption.
    pub candidate: &'a str,
    /// Reference captions.
    pub references: Vec<&'a str>,
}

/// Corpus scores.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CaptionScores {
    /// BLEU-1..4.
    pub bleu: [f64; 4],
    /// ROUGE-L.
    pub rouge_l: f64,
    /// CIDEr-D.
    pub cider_d: f64,
}

impl std::fmt::Display for CaptionScores {
    /// One line: `BLEU-1..4 a b c d, ROUGE-L r, CIDEr-D c` (3 decimals).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.bleu;
        write!(
            f,
            "BLEU-1..4 {:.3} {:.3} {:.3} {:.3}, ROUGE-L {:.3}, CIDEr-D {:.3}",
            b[0], b[1], b[2], b[3], self.rouge_l, self.cider_d
        )
    }
}

type Ngram<'a> = Vec<&'a str>;

/// Counts of every 1..=n-gram of `s` (whitespace tokens).
fn ngram_counts(s: &str, n: usize) -> HashMap<Ngram<'_>, usize> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let mut counts = HashMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU-1..4 (pycocoevalcap's `BleuScorer` with `option="closest"`).
pub fn bleu(images: &[Scored<'_>]) -> [f64; 4] {
    const N: usize = 4;
    let (small, tiny) = (1e-9, 1e-15);
    let (mut guess, mut correct) = ([0usize; N], [0usize; N]);
    let (mut testlen, mut reflen) = (0usize, 0usize);
    for im in images {
        let mut max_ref: HashMap<Ngram<'_>, usize> = HashMap::new();
        let mut lens = Vec::new();
        for r in &im.references {
            lens.push(r.split_whitespace().count());
            for (g, c) in ngram_counts(r, N) {
                let m = max_ref.entry(g).or_insert(0);
                *m = (*m).max(c);
            }
        }
        let len = im.candidate.split_whitespace().count();
        // The closest reference length; on a tie, the shorter one.
        let closest = lens
            .iter()
            .map(|&l| (l.abs_diff(len), l))
            .min()
            .map_or(0, |p| p.1);
        testlen += len;
        reflen += closest;
        for (k, g) in guess.iter_mut().enumerate() {
            *g += len.saturating_sub(k);
        }
        for (g, c) in ngram_counts(im.candidate, N) {
            correct[g.len() - 1] += c.min(max_ref.get(&g).copied().unwrap_or(0));
        }
    }
    let mut out = [0.0; N];
    let mut product = 1.0f64;
    for k in 0..N {
        product *= (correct[k] as f64 + tiny) / (guess[k] as f64 + small);
        out[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (testlen as f64 + tiny) / (reflen as f64 + small);
    if ratio < 1.0 {
        for v in &mut out {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

/// Length of the longest common subsequence of two token lists.
fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// ROUGE-L of one image: best precision and best recall over the references, combined with
/// beta 1.2.
pub fn rouge_l_image(im: &Scored<'_>) -> f64 {
    let beta2 = 1.2f64 * 1.2;
    // pycocoevalcap splits on single spaces.
    let c: Vec<&str> = im.candidate.split(' ').collect();
    let (mut p, mut r) = (0.0f64, 0.0f64);
    for reference in &im.references {
        let t: Vec<&str> = reference.split(' ').collect();
        let l = lcs(&t, &c) as f64;
        p = p.max(l / c.len() as f64);
        r = r.max(l / t.len() as f64);
    }
    if p != 0.0 && r != 0.0 {
        ((1.0 + beta2) * p * r) / (r + beta2 * p)
    } else {
        0.0
    }
}

/// tf-idf vectors per n-gram order, their norms, and the "length" (pycocoevalcap counts the
/// bigrams here, and so do we).
#[allow(clippy::type_complexity)]
fn tfidf<'a>(
    counts: &HashMap<Ngram<'a>, usize>,
    df: &HashMap<Ngram<'a>, f64>,
    ref_len: f64,
) -> (Vec<HashMap<Ngram<'a>, f64>>, [f64; 4], usize) {
    let mut vec: Vec<HashMap<Ngram<'a>, f64>> = vec![HashMap::new(); 4];
    let mut norm = [0.0f64; 4];
    let mut length = 0usize;
    for (g, &tf) in counts {
        let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = g.len() - 1;
        let v = tf as f64 * (ref_len - d);
        vec[n].insert(g.clone(), v);
        norm[n] += v * v;
        if n == 1 {
            length += tf;
        }
    }
    (vec, norm.map(f64::sqrt), length)
}

/// CIDEr-D of every image (pycocoevalcap's `CiderScorer`, n 4, sigma 6).
pub fn cider_d_per_image(images: &[Scored<'_>]) -> Vec<f64> {
    const N: usize = 4;
    let sigma = 6.0f64;
    let refs: Vec<Vec<HashMap<Ngram<'_>, usize>>> = images
        .iter()
        .map(|im| im.references.iter().map(|r| ngram_counts(r, N)).collect())
        .collect();
    let mut df: HashMap<Ngram<'_>, f64> = HashMap::new();
    for image_refs in &refs {
        let unique: HashSet<&Ngram<'_>> = image_refs.iter().flat_map(|c| c.keys()).collect();
        for g in unique {
            *df.entry(g.clone()).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (images.len() as f64).ln();
    images
        .iter()
        .zip(&refs)
        .map(|(im, image_refs)| {
            let (vh, nh, lh) = tfidf(&ngram_counts(im.candidate, N), &df, ref_len);
            let mut score = [0.0f64; N];
            for r in image_refs {
                let (vr, nr, lr) = tfidf(r, &df, ref_len);
                let delta = lh as f64 - lr as f64;
                for n in 0..N {
                    let mut val = 0.0;
                    for (g, &h) in &vh[n] {
                        let rv = vr[n].get(g).copied().unwrap_or(0.0);
                        val += h.min(rv) * rv;
                    }
                    if nh[n] != 0.0 && nr[n] != 0.0 {
                        val /= nh[n] * nr[n];
                    }
                    score[n] += val * (-(delta * delta) / (2.0 * sigma * sigma)).exp();
                }
            }
            score.iter().sum::<f64>() / N as f64 / image_refs.len() as f64 * 10.0
        })
        .collect()
}

/// All corpus scores.
pub fn caption_scores(images: &[Scored<'_>]) -> CaptionScores {
    let n = images.len().max(1) as f64;
    CaptionScores {
        bleu: bleu(images),
        rouge_l: images.iter().map(rouge_l_image).sum::<f64>() / n,
        cider_d: cider_d_per_image(images).iter().sum::<f64>() / n,
    }
}
