//! One request's work as the codec hands it to the batcher, and its result coming back: plain
//! data both layers stand on.

use std::time::Duration;

use super::HostTensor;

/// One request's input: a tensor per model input, all with the same leading (row) dimension.
#[derive(Debug, Clone)]
pub struct Item {
    pub inputs: Vec<HostTensor>,
    /// A text item's real (unpadded) tokens, 0 for other items. The batcher does not read it;
    /// it comes back in [`Inferred::tokens`], so the answer can pool and count them.
    pub tokens: usize,
}

impl Item {
    pub fn new(inputs: Vec<HostTensor>) -> Self {
        Self { inputs, tokens: 0 }
    }

    /// A text item of `tokens` real tokens.
    pub fn with_tokens(inputs: Vec<HostTensor>, tokens: usize) -> Self {
        Self { inputs, tokens }
    }

    /// Rows (examples) in this item.
    pub fn rows(&self) -> usize {
        self.inputs.first().map_or(0, HostTensor::rows)
    }
}

/// One item's result.
#[derive(Debug)]
pub struct Inferred {
    /// The item's rows of every model output (padded along variable dimensions when its batch
    /// was).
    pub outputs: Vec<HostTensor>,
    /// The item's [`Item::tokens`].
    pub tokens: usize,
    /// Rows in the forward pass that computed this item.
    pub batch_size: usize,
    /// Time from admission to dispatch.
    pub queue_time: Duration,
    /// Time of the forward pass, stacking and splitting included.
    pub compute_time: Duration,
}
