//! Text: a Hugging Face tokenizer to token ids, truncated to the model's maximum length.

use tokenizers::Tokenizer;

use super::CodecError;
use crate::config::model_spec::TextSpec;
use crate::tensor::HostTensor;

/// Tokenises strings for one model.
pub struct TextCodec {
    tokenizer: Tokenizer,
    max_length: usize,
    max_bytes: usize,
}

impl TextCodec {
    /// Loads the model's `tokenizer.json`. Texts over `max_bytes` are refused (0: no limit).
    pub fn load(spec: &TextSpec, max_bytes: usize) -> Result<Self, String> {
        let tokenizer = Tokenizer::from_file(&spec.tokenizer)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", spec.tokenizer.display()))?;
        Ok(Self {
            tokenizer,
            max_length: spec.max_length,
            max_bytes,
        })
    }

    /// Token ids of `text`, truncated to `max_length`, as a `[1, len]` INT64 tensor.
    pub fn encode(&self, text: &str) -> Result<HostTensor, CodecError> {
        let ids = self.ids(text)?;
        Ok(HostTensor::from_i64(vec![1, ids.len()], &ids).expect("shape from ids"))
    }

    /// Token ids of `text`, truncated to `max_length`.
    pub fn ids(&self, text: &str) -> Result<Vec<i64>, CodecError> {
        if self.max_bytes > 0 && text.len() > self.max_bytes {
            return Err(CodecError::TooLarge(format!(
                "text of {} bytes; at most {} are accepted",
                text.len(),
                self.max_bytes
            )));
        }
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| CodecError::Invalid(format!("cannot tokenise text: {e}")))?;
        let ids: Vec<i64> = encoding
            .get_ids()
            .iter()
            .take(self.max_length)
            .map(|&id| id as i64)
            .collect();
        if ids.is_empty() {
            return Err(CodecError::Invalid(
                "text is empty (no tokens after tokenisation)".into(),
            ));
        }
        Ok(ids)
    }
}
