//! The fast path for the common /v1 body: numeric instances scanned straight from the JSON
//! text, without serde.

use super::grid::Grid;
use super::visitor::Instance;

/// The fast path for the common /v1 body: the raw JSON text of an `instances` array whose
/// every instance is a number or a non-empty rectangular nested array of numbers, scanned once
/// with the numbers going straight into each instance's flat buffer (about 5x faster than
/// serde's visitor for the 12,288 numbers of an image).
///
/// `None` for anything else — strings, objects, booleans, null, empty or ragged arrays, numbers
/// out of range, nesting deeper than 32, invalid JSON — and the caller then parses with serde,
/// which accepts or refuses it with its exact message. Where both accept, both give the same
/// instances (a property test holds them to it).
pub fn numeric_instances(raw: &str) -> Option<Vec<Instance>> {
    let mut s = Scanner {
        b: raw.as_bytes(),
        i: 0,
        literals: false,
    };
    let out = s.instances()?;
    s.end().then_some(out)
}

/// [`numeric_instances`] for a whole /v1 body that is exactly `{"instances": [...]}` (the
/// common case, without a first pass to find the array); `None` for anything else.
pub fn numeric_body(body: &[u8]) -> Option<Vec<Instance>> {
    let mut s = Scanner {
        b: body,
        i: 0,
        literals: false,
    };
    s.ws();
    s.eat(b'{')?;
    s.ws();
    for &c in b"\"instances\"" {
        s.eat(c)?;
    }
    s.ws();
    s.eat(b':')?;
    let out = s.instances()?;
    s.ws();
    s.eat(b'}')?;
    s.end().then_some(out)
}

/// Deepest nesting the fast path takes (an image is 3 deep; serde takes over beyond).
const MAX_FAST_DEPTH: usize = 32;

pub(super) struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// Takes Triton's `NaN`, `Infinity` and `-Infinity` literals as numbers (v2 data only).
    literals: bool,
}

impl Scanner<'_> {
    /// The whole of `raw` as a number or a nested array of at most `max` numbers; `None` for
    /// anything the fast path does not take (the caller then asks serde).
    pub(super) fn grid(raw: &str, max: usize, literals: bool) -> Option<Grid> {
        let mut s = Scanner {
            b: raw.as_bytes(),
            i: 0,
            literals,
        };
        s.ws();
        let grid = if s.peek()? == b'[' {
            let Instance::Array { values, shape } = s.array()? else {
                return None;
            };
            Grid {
                values,
                shape,
                booleans: false,
            }
        } else {
            Grid {
                values: vec![s.number()?],
                shape: vec![],
                booleans: false,
            }
        };
        (s.end() && grid.values.len() <= max).then_some(grid)
    }

    /// `[instance, ...]`, each a number or a nested array of numbers.
    fn instances(&mut self) -> Option<Vec<Instance>> {
        self.ws();
        self.eat(b'[')?;
        let mut out = Vec::new();
        loop {
            self.ws();
            out.push(if self.peek()? == b'[' {
                self.array()?
            } else {
                Instance::Number(self.number()?)
            });
            self.ws();
            match self.bump()? {
                b',' => continue,
                b']' => return Some(out),
                _ => return None,
            }
        }
    }

    /// Only whitespace is left.
    fn end(&mut self) -> bool {
        self.ws();
        self.i == self.b.len()
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline]
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.bump()? == c).then_some(())
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// A nested array whose depth is that of its leading run of `[`.
    fn array(&mut self) -> Option<Instance> {
        let mut depth = 0;
        let mut j = self.i;
        while let Some(&c) = self.b.get(j) {
            match c {
                b'[' => depth += 1,
                b' ' | b'\n' | b'\r' | b'\t' => {}
                _ => break,
            }
            j += 1;
        }
        if depth > MAX_FAST_DEPTH {
            return None;
        }
        let mut shape = vec![0usize; depth];
        let mut values = Vec::new();
        self.level(0, &mut shape, &mut values)?;
        Some(Instance::Array { values, shape })
    }

    /// One `[...]` at `d`; the first one at each depth fixes its length, later ones must match.
    fn level(&mut self, d: usize, shape: &mut [usize], values: &mut Vec<f64>) -> Option<()> {
        self.ws();
        self.eat(b'[')?;
        let leaf = d + 1 == shape.len();
        let mut n = 0usize;
        loop {
            self.ws();
            if leaf {
                values.push(self.number()?);
            } else {
                self.level(d + 1, shape, values)?;
            }
            n += 1;
            self.ws();
            match self.bump()? {
                b',' => continue,
                b']' => break,
                _ => return None,
            }
        }
        // n >= 1 (an empty array is not a number), so 0 marks a depth not seen yet
        if shape[d] == 0 {
            shape[d] = n;
        }
        (shape[d] == n).then_some(())
    }

    /// A JSON number, with serde_json's value: integers of up to 18 digits exactly, anything
    /// else correctly rounded (serde_json's `float_roundtrip`); non-finite results refused.
    #[inline]
    fn number(&mut self) -> Option<f64> {
        if self.literals {
            for (text, v) in [
                (&b"NaN"[..], f64::NAN),
                (b"Infinity", f64::INFINITY),
                (b"-Infinity", f64::NEG_INFINITY),
                (b"\"NaN\"", f64::NAN),
                (b"\"Infinity\"", f64::INFINITY),
                (b"\"-Infinity\"", f64::NEG_INFINITY),
            ] {
                if self.b[self.i..].starts_with(text) {
                    self.i += text.len();
                    return Some(v);
                }
            }
        }
        let start = self.i;
        let neg = self.peek()? == b'-';
        if neg {
            self.i += 1;
        }
        let int_start = self.i;
        let mut mag = 0u64;
        match self.bump()? {
            b'0' => {}
            c @ b'1'..=b'9' => {
                mag = (c - b'0') as u64;
                while let Some(c @ b'0'..=b'9') = self.peek() {
                    mag = mag.wrapping_mul(10).wrapping_add((c - b'0') as u64);
                    self.i += 1;
                }
            }
            _ => return None,
        }
        let int_digits = self.i - int_start;
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digits()?;
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digits()?;
            float = true;
        }
        if !float && int_digits <= 18 {
            let v = mag as f64;
            return Some(if neg { -v } else { v });
        }
        // the slice is ASCII digits, sign, point and exponent, checked above
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        text.parse::<f64>().ok().filter(|v| v.is_finite())
    }

    /// One or more decimal digits.
    #[inline]
    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        (self.i > start).then_some(())
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use proptest::prelude::*;

    fn serde(s: &str) -> Option<Vec<Instance>> {
        serde_json::from_str(s).ok()
    }

    #[test]
    fn scans_numbers_and_nested_arrays() {
        let got = numeric_instances(" [ [[1, 2.5],[3e2 ,-4]] , 7, [0.125] ] ").unwrap();
        assert_eq!(
            got,
            vec![
                Instance::Array {
                    values: vec![1.0, 2.5, 300.0, -4.0],
                    shape: vec![2, 2]
                },
                Instance::Number(7.0),
                Instance::Array {
                    values: vec![0.125],
                    shape: vec![1]
                },
            ]
        );
        assert_eq!(Some(got), serde(" [ [[1, 2.5],[3e2 ,-4]] , 7, [0.125] ] "));
    }

    #[test]
    fn leaves_everything_else_to_serde() {
        for s in [
            "[]",
            "[[]]",
            "[[1], []]",
            "[[[1, 2], [3]]]",
            "[[[1, 2], 3]]",
            "[[1, [2]]]",
            "[[[1], [[2]]]]",
            "[\"text\"]",
            "[{\"b64\": \"x\"}]",
            "[true]",
            "[null]",
            "[01]",
            "[1.]",
            "[.5]",
            "[+1]",
            "[1e]",
            "[1e400]",
            "[-]",
            "[1,]",
            "[1] x",
            "[1",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ] {
            assert_eq!(numeric_instances(s), None, "{s}");
        }
    }

    #[test]
    fn numbers_match_serde_at_the_edges() {
        for s in [
            "[-0]",
            "[-0.0]",
            "[123456789012345678]",
            "[1234567890123456789]",
            "[18446744073709551615]",
            "[18446744073709551616]",
            "[-9223372036854775808]",
            "[99999999999999999999999999]",
            "[0.1]",
            "[2.2250738585072011e-308]",
            "[1.7976931348623157e308]",
            "[5e-324]",
            "[1E+2]",
        ] {
            let fast = numeric_instances(s).unwrap_or_else(|| panic!("{s}"));
            let (Instance::Number(a), Some(Instance::Number(b))) =
                (&fast[0], serde(s).and_then(|v| v.into_iter().next()))
            else {
                panic!("{s}");
            };
            assert_eq!(a.to_bits(), b.to_bits(), "{s}");
        }
    }

    /// A nested array of the given shape, numbers printed in several styles.
    fn nested(shape: &[usize], values: &mut impl Iterator<Item = String>) -> String {
        match shape.split_first() {
            None => values.next().unwrap(),
            Some((n, rest)) => {
                let items: Vec<String> = (0..*n).map(|_| nested(rest, values)).collect();
                format!("[{}]", items.join(" ,\n"))
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_serde(
            shapes in prop::collection::vec(prop::collection::vec(1usize..4, 0..4), 1..4),
            numbers in prop::collection::vec(
                prop_oneof![
                    any::<i64>().prop_map(|v| v.to_string()),
                    any::<u64>().prop_map(|v| v.to_string()),
                    any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| format!("{v:e}")),
                    any::<f32>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| v.to_string()),
                    (0u32..256).prop_map(|v| v.to_string()),
                ],
                64,
            ),
        ) {
            let mut it = numbers.into_iter().cycle();
            let body = format!(
                "[{}]",
                shapes.iter().map(|s| nested(s, &mut it)).collect::<Vec<_>>().join(", ")
            );
            let fast = numeric_instances(&body);
            prop_assert!(fast.is_some(), "fast path refused {}", body);
            prop_assert_eq!(fast, serde(&body));
        }

        #[test]
        fn never_disagrees_on_arbitrary_text(s in "[\\[\\]0-9eE.,+\\- ]{0,40}") {
            if let Some(fast) = numeric_instances(&s) {
                prop_assert_eq!(Some(fast), serde(&s));
            }
        }
    }
}
