//! What the model's steps cost, to keep running streams at their pace while long prompts are
//! computed beside them: with `max_decode_slowdown` set, a step that carries decoding sequences
//! carries at most as many prompt tokens as make it take that many times a step of decoding
//! alone (from what recent steps took), so that a burst of long prompts slows each stream's
//! tokens by that factor at most, the prompts taking longer instead.
//!
//! A prompt piece's cost is not its length alone: each of its tokens attends to every position
//! before it, so a piece late in a long prompt costs several times one at its start (SmolLM2 on
//! the CPU: 75 tokens at position 0 add about 25 ms to a step, at position 2,000 about 145).
//! The seconds prompt tokens add to a step are fitted, over recent steps, as `per_token x tokens
//! + per_pair x (tokens x positions attended)`, and a piece is sized from where it starts.

/// Recent steps' costs.
#[derive(Debug)]
pub(super) struct Pace {
    /// How many times a decode-only step a step beside prompts may take; 0: no bound.
    slowdown: f64,
    /// Seconds of a step with decoding sequences only (a moving average).
    decode_step: Option<f64>,
    /// The prompt tokens' part of recent steps.
    prompts: Fit,
}

/// Weight of the newest decode-only step in its average.
const WEIGHT: f64 = 0.2;

/// How much each step's weight in the fit falls per newer step (the fit remembers about the
/// last ten steps).
const FORGET: f64 = 0.9;

/// Positions are counted in thousands in the fit, so that both its terms are of a size.
const POSITIONS: f64 = 1000.0;

fn blend(average: &mut Option<f64>, value: f64) {
    *average = Some(match *average {
        Some(a) => a + WEIGHT * (value - a),
        None => value,
    });
}

/// Least squares of `seconds = per_token x tokens + per_pair x pairs` over recent steps, older
/// ones weighing less (`FORGET`).
#[derive(Debug, Default)]
struct Fit {
    /// The normal equations' matrix and right-hand side.
    xx: [[f64; 2]; 2],
    xy: [f64; 2],
    steps: usize,
}

impl Fit {
    fn add(&mut self, x: [f64; 2], y: f64) {
        for (i, xi) in x.iter().enumerate() {
            for (j, xj) in x.iter().enumerate() {
                self.xx[i][j] = FORGET * self.xx[i][j] + xi * xj;
            }
            self.xy[i] = FORGET * self.xy[i] + xi * y;
        }
        self.steps += 1;
    }

    /// `(per_token, per_pair)`, neither negative; `None` before the first step.
    fn costs(&self) -> Option<(f64, f64)> {
        if self.steps == 0 {
            return None;
        }
        let [[a, b], [c, d]] = self.xx;
        let det = a * d - b * c;
        // both terms where the steps tell them apart; else the tokens' term alone
        if det > 1e-9 * a * d && a > 0.0 {
            let per_token = (d * self.xy[0] - b * self.xy[1]) / det;
            let per_pair = (a * self.xy[1] - c * self.xy[0]) / det;
            if per_token >= 0.0 && per_pair >= 0.0 {
                return Some((per_token, per_pair));
            }
        }
        (a > 0.0).then(|| ((self.xy[0] / a).max(1e-9), 0.0))
    }
}

impl Pace {
    pub fn new(slowdown: f64) -> Self {
        Self {
            slowdown,
            decode_step: None,
            prompts: Fit::default(),
        }
    }

    /// Prompt tokens a step with decoding sequences may carry for a prompt whose piece starts
    /// at position `start`, at least `floor` (so that prompts always move); `None`: no bound
    /// (none set, or no costs known yet).
    pub fn prompt_limit(&self, floor: usize, start: usize) -> Option<usize> {
        if self.slowdown <= 1.0 {
            return None;
        }
        let decode = self.decode_step?;
        let (per_token, per_pair) = self.prompts.costs()?;
        let room = (self.slowdown - 1.0) * decode;
        // per_token n + per_pair n (start + n / 2) / POSITIONS <= room
        let linear = (per_token + per_pair * start as f64 / POSITIONS).max(1e-12);
        let square = per_pair / (2.0 * POSITIONS);
        let tokens = if square > 0.0 {
            (-linear + (linear * linear + 4.0 * square * room).sqrt()) / (2.0 * square)
        } else {
            room / linear
        };
        Some((tokens.min(1e9) as usize).max(floor))
    }

    /// A step computed `prompt` prompt tokens, whose queries attended to `pairs` positions in
    /// all (each token to those up to its own), and `decode` decoding sequences' tokens in
    /// `seconds`.
    pub fn observe(&mut self, prompt: usize, pairs: f64, decode: usize, seconds: f64) {
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
        self.prompts.add(
            [prompt as f64, pairs / POSITIONS],
            (seconds - decoding).max(0.0),
        );
    }
}

/// The positions a piece of `len` prompt tokens from `start` attends to, all its tokens
/// together (each its own position and those before it).
pub(super) fn pairs(start: usize, len: usize) -> f64 {
    len as f64 * (start as f64 + (len as f64 + 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_beside_decoding_are_bounded_by_the_slowdown() {
        let mut pace = Pace::new(2.0);
        assert_eq!(pace.prompt_limit(16, 0), None);
        // decoding alone: 100 ms a step; a prompt alone: 5 ms a token
        pace.observe(0, 0.0, 16, 0.1);
        pace.observe(200, pairs(0, 200), 0, 1.0);
        // twice a decode step leaves 100 ms for prompt tokens: about 20 of them
        let limit = pace.prompt_limit(16, 0).unwrap();
        assert!((19..=21).contains(&limit), "{limit}");
        assert_eq!(pace.prompt_limit(32, 0), Some(32));
        // a mixed step of 20 prompt tokens that took 300 ms: prompt tokens cost more now
        pace.observe(20, pairs(0, 20), 16, 0.3);
        assert!(pace.prompt_limit(1, 0).unwrap() < limit);
        // unset or 1: no bound
        assert_eq!(Pace::new(0.0).prompt_limit(16, 0), None);
        let mut off = Pace::new(1.0);
        off.observe(0, 0.0, 16, 0.1);
        off.observe(200, pairs(0, 200), 0, 1.0);
        assert_eq!(off.prompt_limit(16, 0), None);
    }

    /// Prompt tokens that cost more the later they sit in their prompt (attention to the
    /// positions before them), as pieces of 2,000-token prompts beside 16 streams: once the
    /// fit has seen pieces along a prompt, a piece sized from where it starts keeps its step
    /// within 5% of twice a decode step, at the prompt's start and at its end alike (a fit of
    /// tokens alone is off at one end or the other).
    #[test]
    fn pieces_late_in_a_long_prompt_are_smaller() {
        // 100 ms a decode step; a prompt token 0.3 ms, plus 0.8 ms per 1,000 positions it
        // attends to (about SmolLM2's on this CPU)
        let cost = |start: usize, len: usize| 0.1 + 3e-4 * len as f64 + 8e-7 * pairs(start, len);
        let mut pace = Pace::new(2.0);
        pace.observe(0, 0.0, 16, 0.1);
        // the pieces of two prompts, each as large as the pace allows
        for _ in 0..2 {
            let mut start = 0;
            while start < 2000 {
                let len = pace.prompt_limit(16, start).unwrap_or(64).min(2000 - start);
                pace.observe(len, pairs(start, len), 16, cost(start, len));
                start += len;
            }
        }
        for start in [0, 1000, 1900] {
            let len = pace.prompt_limit(16, start).unwrap();
            let step = cost(start, len);
            assert!(
                (0.19..=0.21).contains(&step),
                "{start}: {len} tokens, {step} s"
            );
        }
        assert!(pace.prompt_limit(16, 1900).unwrap() < pace.prompt_limit(16, 0).unwrap() / 2);
    }
}
