//! `chat`: a multi-turn conversation in the terminal. The KV cache is kept across turns, so each
//! turn only runs its own tokens: the end of the previous answer, the new user message (images
//! attached with `/image PATH`) and the assistant header.

use std::io::{BufRead, Write};

use burn::prelude::*;

use super::args::ChatArgs;
use super::caption::{Session, TextStream};
use crate::checkpoint::WeightDType;
use crate::data::template::{Part, Role, Turn};
use crate::data::ProcessedImage;
use crate::error::{Error, Result};
use crate::infer::generate::generate;
use crate::model::{KvCache, ModelInputs};

const HELP: &str = "type a message; /image PATH attaches an image to the next message, /reset \
                    starts over, /quit ends";

/// A conversation: the cache and the tokens it holds.
struct Conversation<B: Backend> {
    cache: KvCache<B>,
    history: Vec<Vec<u32>>,
    /// The last token of the previous answer, not yet run (its stop token or its last token).
    pending: Option<u32>,
    system: Option<String>,
}

impl<B: Backend> Conversation<B> {
    fn new(layers: usize, system: Option<String>) -> Self {
        Self {
            cache: KvCache::new(layers, 1),
            history: vec![Vec::new()],
            pending: None,
            system,
        }
    }

    /// The token ids of the next turn: the close of the previous answer, the user message,
    /// and the assistant header.
    fn turn_ids(
        &self,
        session: &Session<B>,
        text: &str,
        images: &[ProcessedImage],
    ) -> Result<Vec<u32>> {
        let enc = &session.encoder;
        let merge = session.images.merge_size;
        let mut parts: Vec<Part> = images.iter().map(|_| Part::Image).collect();
        parts.push(Part::Text(text.to_string()));
        let mut turns = Vec::new();
        if self.cache.is_empty() {
            if let Some(s) = &self.system {
                turns.push(Turn {
                    role: Role::System,
                    parts: vec![Part::Text(s.clone())],
                });
            }
        }
        turns.push(Turn {
            role: Role::User,
            parts,
        });
        let tokens: Vec<usize> = images.iter().map(|i| i.num_tokens(merge)).collect();
        let body = enc.encode_chat(&turns, true, &tokens)?;
        if self.cache.is_empty() {
            return Ok(body);
        }
        // The template closes an answer with `<|im_end|>\n`.
        let mut ids = Vec::new();
        match self.pending {
            Some(t) if t == enc.tokens.im_end => ids.push(t),
            Some(t) => ids.extend([t, enc.tokens.im_end]),
            None => ids.push(enc.tokens.im_end),
        }
        ids.extend(enc.tokenize("\n")?);
        ids.extend(body);
        Ok(ids)
    }
}

/// Runs `chat` on stdin/stdout.
pub fn run_chat<B: Backend>(
    args: &ChatArgs,
    default_dtype: WeightDType,
    device: &B::Device,
) -> Result<()> {
    let session = Session::<B>::open(
        &args.model,
        &args.images,
        &args.generation,
        default_dtype,
        device,
    )?;
    let layers = session.model.language_model.layers.len();
    let mut convo = Conversation::<B>::new(layers, args.system.clone());
    let mut attached: Vec<ProcessedImage> = Vec::new();
    eprintln!("{HELP}");
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("> ");
        let _ = std::io::stdout().flush();
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("stdin", e))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" || line == "/exit" {
            break;
        }
        if line == "/reset" {
            convo = Conversation::new(layers, args.system.clone());
            attached.clear();
            eprintln!("(conversation cleared)");
            continue;
        }
        if let Some(path) = line.strip_prefix("/image") {
            let path = path.trim();
            match session.images.process_file(std::path::Path::new(path)) {
                Ok(img) => {
                    eprintln!(
                        "(attached {path}: {} image tokens)",
                        img.num_tokens(session.images.merge_size)
                    );
                    attached.push(img);
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        if line.starts_with('/') {
            eprintln!("unknown command; {HELP}");
            continue;
        }
        let images = std::mem::take(&mut attached);
        let ids = convo.turn_ids(&session, line, &images)?;
        let inputs = turn_inputs::<B>(&ids, &images, &session.device);
        let mut stream = TextStream::new(&session.encoder);
        let rows = generate(
            &session.model,
            &mut convo.cache,
            &inputs,
            &mut convo.history,
            &session.generation,
            |_, t| stream.push(t),
        )?;
        println!();
        convo.pending = rows[0].pending;
        if !rows[0].stopped {
            eprintln!("(stopped at --max-new-tokens)");
        }
    }
    Ok(())
}

/// One row of `ids` with the images' patch rows.
fn turn_inputs<B: Backend>(
    ids: &[u32],
    images: &[ProcessedImage],
    device: &B::Device,
) -> ModelInputs<B> {
    let pixel_values = (!images.is_empty()).then(|| {
        let row = images[0].pixel_values.len() / images[0].grid_thw.iter().product::<usize>();
        let data: Vec<f32> = images
            .iter()
            .flat_map(|i| i.pixel_values.iter().copied())
            .collect();
        let rows = data.len() / row;
        Tensor::<B, 2>::from_data(
            TensorData::new(data, [rows, row]),
            (device, burn::tensor::DType::F32),
        )
    });
    ModelInputs {
        input_ids: ids.iter().map(|&i| i as i64).collect(),
        batch: 1,
        len: ids.len(),
        attention_mask: None,
        pixel_values,
        image_grid_thw: images.iter().map(|i| i.grid_thw).collect(),
        image_features: None,
    }
}
