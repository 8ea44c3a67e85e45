//! Incremental detokenisation for streaming: each new token gives the text it adds, never a
//! broken UTF-8 sequence (a character split over byte-fallback tokens waits for its last
//! byte), and the concatenation of every delta equals the decoded whole.
//!
//! The method of text-generation-inference and vLLM: decode a short window of recent tokens
//! with and without the new ones and emit the difference, so that tokenizers whose decoding
//! of a token depends on its neighbours (leading spaces, byte-level BPE) come out right.

/// Turns token ids into text.
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String, String>;

    /// The text with special tokens written out (what tool-call parsers read).
    fn decode_special(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids)
    }
}

impl Decode for tokenizers::Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        std::ops::Deref::deref(self)
            .decode(ids, true)
            .map_err(|e| e.to_string())
    }

    fn decode_special(&self, ids: &[u32]) -> Result<String, String> {
        std::ops::Deref::deref(self)
            .decode(ids, false)
            .map_err(|e| e.to_string())
    }
}

/// The replacement character a decoder writes for an incomplete UTF-8 sequence.
const INCOMPLETE: char = '\u{FFFD}';

/// One answer's detokeniser.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Special tokens are written out.
    special: bool,
    /// Where the window of already-emitted tokens starts and ends.
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// One that writes special tokens out.
    pub fn with_special() -> Self {
        Self {
            special: true,
            ..Self::default()
        }
    }

    fn decode(&self, decoder: &dyn Decode, ids: &[u32]) -> Result<String, String> {
        if self.special {
            decoder.decode_special(ids)
        } else {
            decoder.decode(ids)
        }
    }

    /// The text `token` adds (empty while it ends in an incomplete character).
    pub fn push(&mut self, decoder: &dyn Decode, token: u32) -> Result<String, String> {
        self.ids.push(token);
        let before = self.decode(decoder, &self.ids[self.prefix..self.read])?;
        let after = self.decode(decoder, &self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with(INCOMPLETE) {
            let delta = match after.get(before.len()..) {
                Some(d) if after.starts_with(&before) => d.to_string(),
                // the window decodes differently with the new token: emit what it adds
                // past the common prefix
                _ => after
                    .char_indices()
                    .zip(before.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or_else(String::new, |((i, _), _)| after[i..].to_string()),
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text still held at the end of the answer (an incomplete character, as the decoder
    /// writes it).
    pub fn finish(&mut self, decoder: &dyn Decode) -> Result<String, String> {
        let before = self.decode(decoder, &self.ids[self.prefix..self.read])?;
        let after = self.decode(decoder, &self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }

    /// Every token so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token is some bytes; decoding joins them, writing U+FFFD for bytes that are not
    /// (yet) valid UTF-8, like a byte-fallback tokenizer.
    struct Bytes(Vec<Vec<u8>>);

    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| self.0[i as usize].clone())
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn stream(d: &Bytes, ids: &[u32]) -> Vec<String> {
        let mut t = Detokenizer::new();
        let mut out: Vec<String> = ids.iter().map(|&i| t.push(d, i).unwrap()).collect();
        out.push(t.finish(d).unwrap());
        out
    }

    #[test]
    fn a_character_split_over_tokens_waits_for_its_last_byte() {
        // 你 is E4 BD A0, 好 is E5 A5 BD
        let d = Bytes(vec![
            b"Hi ".to_vec(),
            vec![0xE4],
            vec![0xBD, 0xA0],
            vec![0xE5, 0xA5],
            vec![0xBD],
            b"!".to_vec(),
        ]);
        let deltas = stream(&d, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(deltas, ["Hi ", "", "你", "", "好", "!", ""]);
        assert!(deltas.iter().all(|s| !s.contains(INCOMPLETE)));
        assert_eq!(deltas.concat(), d.decode(&[0, 1, 2, 3, 4, 5]).unwrap());
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_flushed_as_the_decoder_writes_it() {
        let d = Bytes(vec![b"a".to_vec(), vec![0xE4]]);
        let deltas = stream(&d, &[0, 1]);
        assert_eq!(deltas.concat(), d.decode(&[0, 1]).unwrap());
    }

    #[test]
    fn real_tokenizer_deltas_concatenate_to_the_whole_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/text-classifier/tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(path).unwrap();
        let text = "the movie was great, and the ending surprised me";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let mut t = Detokenizer::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&t.push(&tok, id).unwrap());
        }
        out.push_str(&t.finish(&tok).unwrap());
        assert_eq!(out, Decode::decode(&tok, &ids).unwrap());
    }
}
