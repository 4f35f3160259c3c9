//! The caption tokenisation of the COCO evaluation code: Stanford's PTB tokenizer run with
//! `-lowerCase`, then the punctuation tokens dropped. This covers what captions contain:
//! punctuation split from words, clitics (`n't`, `'s`, `'re`, `'ve`, `'ll`, `'d`, `'m`) split
//! off, hyphenated words and numbers kept whole, brackets written `-lrb-`/`-rrb-`... (which the
//! COCO code's upper-case punctuation list does not remove).

/// Tokens the COCO code removes after tokenising.
const PUNCTUATION: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Clitics split off the end of a word.
const CLITICS: [&str; 7] = ["n't", "'s", "'re", "'ve", "'ll", "'d", "'m"];

/// A caption as the COCO evaluation sees it: lower-case tokens joined by single spaces.
pub fn ptb_tokenize(caption: &str) -> String {
    let lower = caption.to_lowercase();
    let mut tokens: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        split_chunk(chunk, &mut tokens);
    }
    tokens
        .into_iter()
        .filter(|t| !PUNCTUATION.contains(&t.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Splits one whitespace-free chunk into PTB tokens.
fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = chunk.chars().collect();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            push_word(std::mem::take(word), out);
        }
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let prev_digit = i > 0 && chars[i - 1].is_ascii_digit();
        let next_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        let bracket = match c {
            '(' => Some("-lrb-"),
            ')' => Some("-rrb-"),
            '[' => Some("-lsb-"),
            ']' => Some("-rsb-"),
            '{' => Some("-lcb-"),
            '}' => Some("-rcb-"),
            _ => None,
        };
        if let Some(b) = bracket {
            flush(&mut word, out);
            out.push(b.into());
        } else if (c == '-' || c == '.') && chars.get(i + 1) == Some(&c) {
            // A run of dashes (`--`) or dots (`...`) is one token.
            flush(&mut word, out);
            let run = chars[i..].iter().take_while(|&&d| d == c).count();
            out.push(c.to_string().repeat(run));
            i += run;
            continue;
        } else if (c == ',' || c == '.') && prev_digit && next_digit {
            word.push(c); // 1,000 and 3.5 stay whole
        } else if c == '.' && i + 1 < chars.len() && !word.is_empty() {
            word.push(c); // inner periods (u.s) stay in the word
        } else if matches!(c, ',' | ';' | ':' | '!' | '?' | '.' | '"') {
            flush(&mut word, out);
            out.push(if c == '"' { "''".into() } else { c.to_string() });
        } else if (c == '\'' || c == '`') && word.is_empty() {
            out.push(c.to_string()); // an opening quote
        } else {
            word.push(c);
        }
        i += 1;
    }
    flush(&mut word, out);
}

/// Pushes a word, with a clitic or a closing quote split off its end.
fn push_word(word: String, out: &mut Vec<String>) {
    if let Some(stem) = word.strip_suffix('\'') {
        if !stem.is_empty() {
            push_word(stem.to_string(), out);
        }
        out.push("'".into());
        return;
    }
    for c in CLITICS {
        if let Some(stem) = word.strip_suffix(c) {
            if !stem.is_empty() {
                out.push(stem.to_string());
                out.push(c.to_string());
                return;
            }
        }
    }
    out.push(word);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_ptb_tokenizer() {
        assert_eq!(
            ptb_tokenize("The cat doesn't want you to work -- it sleeps."),
            "the cat does n't want you to work it sleeps"
        );
        assert_eq!(
            ptb_tokenize("A London bus (red) drives past a shop, the bus's doors open!"),
            "a london bus -lrb- red -rrb- drives past a shop the bus 's doors open"
        );
        assert_eq!(
            ptb_tokenize("A black-and-white photo of 1,000 birds; 3.5 metres"),
            "a black-and-white photo of 1,000 birds 3.5 metres"
        );
    }
}
