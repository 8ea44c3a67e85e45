//! What the model's steps cost, to keep running streams at their pace while long prompts are
//! computed beside them: with `max_decode_slowdown` set, a step that carries decoding sequences
//! carries at most as many prompt tokens as make it take that many times a step of decoding
//! alone (from what recent steps took), so that a burst of long prompts slows each stream's
//! tokens by that factor at most, the prompts taking longer instead.

/// Recent steps' costs, as moving averages.
#[derive(Debug)]
pub(super) struct Pace {
    /// How many times a decode-only step a step beside prompts may take; 0: no bound.
    slowdown: f64,
    /// Seconds of a step with decoding sequences only.
    decode_step: Option<f64>,
    /// Seconds per prompt token, beyond the decoding part of a step.
    per_prompt_token: Option<f64>,
}

/// Weight of the newest step in the averages.
const WEIGHT: f64 = 0.2;

fn blend(average: &mut Option<f64>, value: f64) {
    *average = Some(match *average {
        Some(a) => a + WEIGHT * (value - a),
        None => value,
    });
}

impl Pace {
    pub fn new(slowdown: f64) -> Self {
        Self {
            slowdown,
            decode_step: None,
            per_prompt_token: None,
        }
    }

    /// Prompt tokens a step with decoding sequences may carry, at least `floor` (so that
    /// prompts always move); `None`: no bound (none set, or no costs known yet).
    pub fn prompt_limit(&self, floor: usize) -> Option<usize> {
        if self.slowdown <= 1.0 {
            return None;
        }
        let (decode, per_token) = (self.decode_step?, self.per_prompt_token?);
        let tokens = (self.slowdown - 1.0) * decode / per_token.max(1e-9);
        Some((tokens.min(1e9) as usize).max(floor))
    }

    /// A step computed `prompt` prompt tokens and `decode` decoding sequences' tokens in
    /// `seconds`.
    pub fn observe(&mut self, prompt: usize, decode: usize, seconds: f64) {
        if prompt == 0 {
            if decode > 0 {
                blend(&mut self.decode_step, seconds);
            }
            return;
        }
        let decoding = match decode {
            0 => 0.0,
            _ => self.decode_step.unwrap_or(0.0),
        };
        blend(
            &mut self.per_prompt_token,
            ((seconds - decoding) / prompt as f64).max(1e-9),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_beside_decoding_are_bounded_by_the_slowdown() {
        let mut pace = Pace::new(2.0);
        assert_eq!(pace.prompt_limit(16), None);
        // decoding alone: 100 ms a step; a prompt alone: 5 ms a token
        pace.observe(0, 16, 0.1);
        pace.observe(200, 0, 1.0);
        // twice a decode step leaves 100 ms for prompt tokens: 20 of them
        assert_eq!(pace.prompt_limit(16), Some(20));
        assert_eq!(pace.prompt_limit(32), Some(32));
        // a mixed step of 20 prompt tokens that took 300 ms: prompt tokens cost more now
        pace.observe(20, 16, 0.3);
        assert!(pace.prompt_limit(1).unwrap() < 20);
        // unset or 1: no bound
        assert_eq!(Pace::new(0.0).prompt_limit(16), None);
        let mut off = Pace::new(1.0);
        off.observe(0, 16, 0.1);
        off.observe(200, 0, 1.0);
        assert_eq!(off.prompt_limit(16), None);
    }
}
