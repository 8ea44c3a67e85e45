//! Stop strings over streamed text: a stop string may span several tokens, so text that could
//! still become one is held back until it cannot; the answer is cut exactly before the first
//! stop string, which is never emitted.

/// The most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Finds a request's stop strings in its streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet emitted: it ends with the beginning of a stop string.
    held: String,
}

/// What one piece of text gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text that can be emitted now.
    pub text: String,
    /// A stop string was found: the answer ends here (its text excluded).
    pub stopped: bool,
}

impl StopStrings {
    /// Matching `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// The next piece of the answer's text.
    pub fn push(&mut self, text: &str) -> StopStep {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopStep {
                text,
                stopped: true,
            };
        }
        let keep = self.partial_suffix();
        let emit = self.held.len() - keep;
        let text = self.held[..emit].to_string();
        self.held.drain(..emit);
        StopStep {
            text,
            stopped: false,
        }
    }

    /// The text still held when the answer ends for another reason (length, end of sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The length of the longest end of the held text that begins some stop string (shorter
    /// than the whole stop string, else it would have been found).
    fn partial_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > longest && self.held.ends_with(&stop[..k]) {
                    longest = k;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let step = s.push(p);
            out.push_str(&step.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_across_tokens_is_cut_exactly_and_never_emitted() {
        let mut s = StopStrings::new(vec!["</answer>".into()]);
        assert_eq!(s.push("42 </").text, "42 ");
        assert_eq!(s.push("ans").text, "");
        let step = s.push("wer> more");
        assert_eq!(
            step,
            StopStep {
                text: String::new(),
                stopped: true
            }
        );
        assert_eq!(
            stream(&["</answer>"], &["42 </", "ans", "wer> more"]),
            ("42 ".into(), true)
        );
    }

    #[test]
    fn held_text_that_turns_out_not_to_stop_is_emitted() {
        assert_eq!(stream(&["STOP"], &["a ST", "OP!"]), ("a ".into(), true));
        assert_eq!(
            stream(&["STOP"], &["a ST", "ART"]),
            ("a START".into(), false)
        );
        assert_eq!(stream(&["STOP"], &["ends ST"]), ("ends ST".into(), false));
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_kept_whole() {
        assert_eq!(
            stream(&["world", "lo w"], &["hello world"]),
            ("hel".into(), true)
        );
        assert_eq!(stream(&["。"], &["你好", "。再见"]), ("你好".into(), true));
        assert_eq!(stream(&["éx"], &["caf", "é", "!"]), ("café!".into(), false));
        assert_eq!(stream(&[""], &["a", "b"]), ("ab".into(), false));
    }
}
