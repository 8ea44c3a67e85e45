//! Choosing the next token from a step's logits: the request's penalties and biases, then
//! greedy or temperature sampling within top-k, top-p and min-p, with one random generator per
//! request (so a `seed` gives the same text whatever else shares the batch).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The most alternatives a request may ask for at each position (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The largest `logit_bias` value (OpenAI's range is -100..=100).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// How a request's tokens are chosen, as OpenAI's and vLLM's parameters name them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; up to 2.
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`, in
    /// (0, 1].
    pub top_p: f32,
    /// Only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Only tokens at least `min_p` times as likely as the most likely one, in [0, 1].
    pub min_p: f32,
    /// Hugging Face's repetition penalty over the prompt's and the answer's tokens (1: none):
    /// a positive logit is divided by it, a negative one multiplied.
    pub repetition_penalty: f32,
    /// OpenAI's penalty, in [-2, 2], subtracted once from every token the answer holds.
    pub presence_penalty: f32,
    /// OpenAI's penalty, in [-2, 2], subtracted per occurrence in the answer.
    pub frequency_penalty: f32,
    /// Added to a token's logit, in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// The seed of the request's random generator; without one, a random seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// A parameter out of its range: its name (as the request spells it) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

fn out_of_range(param: &'static str, message: String) -> ParamError {
    ParamError { param, message }
}

impl SamplingParams {
    /// Every parameter within its range for a model of `vocab` tokens: out of range is an
    /// error naming the parameter, never a value silently clamped.
    pub fn check(&self, vocab: usize) -> Result<(), ParamError> {
        let within = |param, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(out_of_range(param, format!("{v} is outside [{lo}, {hi}]")))
            }
        };
        within("temperature", self.temperature, 0.0, 2.0)?;
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range(
                "top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        within("min_p", self.min_p, 0.0, 1.0)?;
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(out_of_range(
                "repetition_penalty",
                format!("{} is not a positive number", self.repetition_penalty),
            ));
        }
        within("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        within("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab {
                return Err(out_of_range(
                    "logit_bias",
                    format!("token {token} is beyond the vocabulary of {vocab} tokens"),
                ));
            }
            within("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)?;
        }
        Ok(())
    }

    /// Whether the next token is always the most likely one.
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// One chosen token, its log-probability, and the most likely alternatives when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Its log-probability under the model's distribution (the raw logits, before penalties,
    /// biases and temperature, as vLLM reports by default).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One request's sampler: its parameters, its random generator and the counts its penalties
/// need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
    /// How often each token occurs in the answer so far.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for a request whose prompt is `prompt` (checked parameters).
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut prompt = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            params,
            rng,
            prompt,
            counts: HashMap::new(),
        }
    }

    /// The next token from one position's `logits` (over the whole vocabulary), with
    /// `top_logprobs` alternatives; the token counts toward the penalties from then on.
    pub fn sample(&mut self, logits: &[f32], top_logprobs: usize) -> Sampled {
        self.sample_masked(logits, top_logprobs, &mut |_| Ok(()))
            .expect("no mask to fail")
    }

    /// As [`sample`](Self::sample), with `mask` applied to the scores after the penalties and
    /// biases: a token it sets to minus infinity is never chosen (a grammar's mask). The
    /// reported log-probabilities stay the model's own.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        top_logprobs: usize,
        mask: &mut dyn FnMut(&mut [f32]) -> Result<(), String>,
    ) -> Result<Sampled, String> {
        let logprobs = log_softmax(logits);
        let mut scores = logits.to_vec();
        self.penalise(&mut scores);
        mask(&mut scores)?;
        let token = if self.params.greedy() {
            argmax(&scores)
        } else {
            self.draw(&scores)
        };
        *self.counts.entry(token).or_insert(0) += 1;
        Ok(Sampled {
            token,
            logprob: logprobs[token as usize],
            top: top_n(&logprobs, top_logprobs),
        })
    }

    /// The repetition, presence and frequency penalties and the logit biases.
    fn penalise(&self, scores: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let seen = self.prompt.iter().chain(self.counts.keys());
            for &t in seen {
                let s = &mut scores[t as usize];
                *s = if *s > 0.0 {
                    *s / p.repetition_penalty
                } else {
                    *s * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                scores[t as usize] -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
        for &(t, bias) in &p.logit_bias {
            scores[t as usize] += bias;
        }
    }

    /// A token drawn from the tempered distribution within top-k, top-p and min-p.
    fn draw(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        // most likely first; ties by token id, so that the order never depends on the sort
        order.sort_unstable_by(|&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
        // tokens a mask removed are never candidates
        let finite = order
            .iter()
            .take_while(|&&t| scores[t as usize] > f32::NEG_INFINITY)
            .count()
            .max(1);
        order.truncate(finite);
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let best = scores[order[0] as usize];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&t| (((scores[t as usize] - best) / p.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        // min-p: relative to the most likely token
        let floor = p.min_p as f64 * probs[0];
        let mut keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        // top-p: the smallest prefix reaching it
        let mut mass = 0.0;
        for (i, q) in probs[..keep].iter().enumerate() {
            mass += q;
            if mass >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut x = self.rng.random::<f64>() * kept;
        for (i, q) in probs[..keep].iter().enumerate() {
            x -= q;
            if x <= 0.0 {
                return order[i];
            }
        }
        order[keep - 1]
    }
}

/// The index of the largest value; the first one on a tie (as torch's argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probabilities of logits, in f64 internally for a stable sum.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}

/// The `n` largest values with their indices, largest first (ties by index).
fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn out_of_range_parameters_are_named_not_clamped() {
        let bad = [
            (params(|p| p.temperature = -0.1), "temperature"),
            (params(|p| p.temperature = 2.5), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.5), "top_p"),
            (params(|p| p.min_p = 1.5), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.presence_penalty = 3.0), "presence_penalty"),
            (
                params(|p| p.frequency_penalty = f32::NAN),
                "frequency_penalty",
            ),
            (params(|p| p.logit_bias = vec![(10, 1.0)]), "logit_bias"),
            (params(|p| p.logit_bias = vec![(1, 101.0)]), "logit_bias"),
        ];
        for (p, name) in bad {
            assert_eq!(p.check(10).unwrap_err().param, name, "{p:?}");
        }
        assert!(params(|p| p.logit_bias = vec![(9, -100.0)])
            .check(10)
            .is_ok());
        assert!(SamplingParams::default().check(10).is_ok());
    }

    #[test]
    fn greedy_takes_the_first_best_and_reports_logprobs() {
        let mut s = Sampler::new(params(|p| p.temperature = 0.0), &[]);
        let out = s.sample(&[1.0, 3.0, 3.0, 0.5], 2);
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        let total: f32 = log_softmax(&[1.0, 3.0, 3.0, 0.5])
            .iter()
            .map(|l| l.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((out.logprob - out.top[0].1).abs() < 1e-7);
    }

    #[test]
    fn a_seed_gives_the_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)), &[]);
            (0..20)
                .map(|_| s.sample(&logits, 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_top_p_and_min_p_keep_only_likely_tokens() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        for (p, allowed) in [
            (params(|p| p.top_k = 2), vec![0, 1]),
            // token 0 alone holds ~0.73 of the mass
            (params(|p| p.top_p = 0.5), vec![0]),
            (params(|p| p.min_p = 0.2), vec![0, 1]),
        ] {
            let mut s = Sampler::new(SamplingParams { seed: Some(1), ..p }, &[]);
            for _ in 0..200 {
                let t = s.sample(&logits, 0).token;
                assert!(allowed.contains(&t), "{t} not in {allowed:?}");
            }
        }
    }

    #[test]
    fn penalties_and_biases_move_the_choice() {
        let logits = [2.0, 1.9, 0.0];
        // a bias makes the last token the best
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(2, 5.0)];
            }),
            &[],
        );
        assert_eq!(s.sample(&logits, 0).token, 2);
        // once said, a frequency penalty hands the lead to the runner-up
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 0.5;
            }),
            &[],
        );
        assert_eq!(s.sample(&logits, 0).token, 0);
        assert_eq!(s.sample(&logits, 0).token, 1);
        // the repetition penalty counts the prompt's tokens
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.2;
            }),
            &[0],
        );
        assert_eq!(s.sample(&logits, 0).token, 1);
    }
}
