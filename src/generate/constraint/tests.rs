use super::*;

/// A byte-level BPE tokenizer: every byte, a few merged tokens and an end-of-sequence token.
fn byte_level() -> Tokenizer {
    let byte_of = gpt2_bytes();
    let mut chars: Vec<(char, u8)> = byte_of.into_iter().collect();
    chars.sort_by_key(|&(_, b)| b);
    let mut vocab = serde_json::Map::new();
    for (c, b) in &chars {
        vocab.insert(c.to_string(), json!(*b as u32));
    }
    // merged tokens: `{"`, `":`, ` "`, `true`, `Ġ` + "yes"
    for (i, t) in ["{\"", "\":", "Ġ\"", "true", "Ġyes", "no"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(256 + i));
    }
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 262, "content": "<|end|>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true},
            {"id": 263, "content": "<call>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": false},
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    json.to_string().parse().expect("a valid tokenizer")
}

const END: u32 = 262;

#[test]
fn byte_level_tokens_are_their_bytes() {
    let t = byte_level();
    // the model's logits may be longer than the tokenizer's vocabulary
    let words = token_bytes(&t, 270);
    assert_eq!(words.len(), 270);
    assert_eq!(words[b'a' as usize], b"a");
    assert_eq!(words[b' ' as usize], b" ");
    assert_eq!(words[b'\n' as usize], b"\n");
    assert_eq!(words[0xff], vec![0xff]);
    assert_eq!(words[256], b"{\"");
    assert_eq!(words[260], b" yes");
    assert_eq!(words[END as usize], b"\xff<|end|>");
    assert_eq!(words[263], b"<call>");
    assert!(words[265].is_empty());
}

#[test]
fn sentencepiece_tokens_are_their_bytes() {
    let json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false,
                  "vocab": {"<unk>": 0, "<0x0A>": 1, "<0xE2>": 2, "▁a": 3, "b": 4, "▁": 5},
                  "merges": []},
    });
    let t: Tokenizer = json.to_string().parse().unwrap();
    let words = token_bytes(&t, 6);
    assert_eq!(words[0], b"\xff<unk>");
    assert_eq!(words[1], b"\n");
    assert_eq!(words[2], vec![0xe2]);
    assert_eq!(words[3], b" a");
    assert_eq!(words[4], b"b");
    assert_eq!(words[5], b" ");
}

fn compile(spec: GrammarSpec) -> Result<Constraint, GrammarError> {
    Grammars::new(Arc::new(byte_level()), 264).compile(&spec)
}

/// The tokens `scores` leaves allowed after the constraint's mask.
fn allowed(c: &mut Constraint) -> Vec<u32> {
    let mut scores = vec![0.0f32; 264];
    c.apply(&mut scores, &[END]).unwrap();
    (0..264u32)
        .filter(|&t| scores[t as usize].is_finite())
        .collect()
}

#[test]
fn a_regex_masks_each_step_and_ends() {
    let mut c = compile(GrammarSpec::Regex("a(b|c)".into())).unwrap();
    assert_eq!(allowed(&mut c), vec![b'a' as u32]);
    assert!(!c.commit(b'a' as u32, false).unwrap());
    assert_eq!(allowed(&mut c), vec![b'b' as u32, b'c' as u32]);
    let done = c.commit(b'c' as u32, false).unwrap();
    // complete: either stopped at once, or only the end is allowed
    assert!(done || allowed(&mut c) == vec![END]);
}

#[test]
fn choices_are_literal() {
    let mut c = compile(GrammarSpec::Choice(vec!["a.b".into(), "no".into()])).unwrap();
    let first = allowed(&mut c);
    assert!(first.contains(&(b'a' as u32)) && first.contains(&(b'n' as u32)));
    assert!(first.contains(&261), "the merged token `no`");
    c.commit(b'a' as u32, false).unwrap();
    assert_eq!(allowed(&mut c), vec![b'.' as u32]);
}

#[test]
fn unsupported_keywords_are_named() {
    let schema = json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true});
    match compile(GrammarSpec::JsonSchema(schema)) {
        Err(GrammarError::Unsupported(keys)) => assert_eq!(keys, vec!["uniqueItems"]),
        other => panic!("{other:?}"),
    }
    let schema = json!({"type": "object", "properties": {"a": {"type": "string", "contains": {}}}});
    let e = compile(GrammarSpec::JsonSchema(schema)).err().unwrap();
    assert!(e.to_string().contains("contains"), "{e}");
    assert!(matches!(
        compile(GrammarSpec::Lark("start: (".into())),
        Err(GrammarError::Invalid(_))
    ));
    let huge = GrammarSpec::Regex("a".repeat(MAX_GRAMMAR_BYTES + 1));
    assert!(matches!(compile(huge), Err(GrammarError::TooLarge(_))));
}

/// Decodes greedily from random scores under the constraint: the mask alone makes the text
/// valid.
fn decode(c: &mut Constraint, seed: u64) -> (String, bool) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = byte_level();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let mut scores: Vec<f32> = (0..264).map(|_| rng.random::<f32>()).collect();
        c.apply(&mut scores, &[END]).unwrap();
        let token = crate::generate::sampling::argmax(&scores);
        let end = token == END;
        if end {
            return (t.decode(&ids, false).unwrap(), true);
        }
        ids.push(token);
        if c.commit(token, false).unwrap() {
            return (t.decode(&ids, false).unwrap(), true);
        }
    }
    (t.decode(&ids, false).unwrap(), false)
}

#[test]
fn random_scores_under_a_schema_give_valid_json() {
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 1, "maximum": 20},
            "tag": {"enum": ["yes", "no"]},
        },
        "required": ["ok", "n", "tag"],
        "additionalProperties": false,
    });
    let base = compile(GrammarSpec::JsonSchema(schema)).unwrap();
    let mut finished = 0;
    for seed in 0..8 {
        let mut c = base.clone();
        let (text, done) = decode(&mut c, seed);
        if !done {
            continue;
        }
        finished += 1;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["ok"].is_boolean(), "{text}");
        let n = v["n"].as_i64().unwrap();
        assert!((1..=20).contains(&n), "{text}");
        assert!(v["tag"] == "yes" || v["tag"] == "no", "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
    assert!(finished > 0, "no decode finished within 200 tokens");
}

#[test]
fn the_real_vocabulary_s_bytes_are_what_the_tokenizer_decodes() {
    // SmolLM2's byte-level BPE (49152 tokens), when the fixtures are built
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".fixtures/llm/smollm2-135m-instruct/tokenizer.json");
    let Ok(t) = Tokenizer::from_file(&path) else {
        eprintln!("skipped: {} is missing (make llm-fixtures)", path.display());
        return;
    };
    let words = token_bytes(&t, 49152);
    let mut checked = 0;
    for (id, word) in words.iter().enumerate() {
        let text = t.decode(&[id as u32], false).unwrap();
        if word.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER) {
            assert_eq!(&word[1..], text.as_bytes(), "special token {id}");
        } else if let Ok(s) = std::str::from_utf8(word) {
            assert_eq!(s, text, "token {id}");
            checked += 1;
        }
    }
    assert!(checked > 45_000, "{checked} tokens checked");
    // a mask over the real vocabulary: words of lower-case letters, then one space
    let g = Grammars::new(Arc::new(t), 49152);
    let mut c = g
        .compile(&GrammarSpec::Regex("[a-z]+ [A-Z]".into()))
        .unwrap();
    let mut scores = vec![0.0f32; 49152];
    c.apply(&mut scores, &[2]).unwrap();
    let allowed = scores.iter().filter(|s| s.is_finite()).count();
    // lower-case words and their prefixes, never a space first
    assert!(allowed > 1000, "{allowed}");
    assert!(scores[words.iter().position(|w| w == b" the").unwrap()].is_infinite());
}
