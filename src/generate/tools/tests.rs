use super::*;

fn events(format: ToolFormat, pieces: &[&str]) -> Vec<ToolEvent> {
    let mut p = ToolParser::new(format);
    let mut out = Vec::new();
    for piece in pieces {
        out.extend(p.push(piece));
    }
    out.extend(p.finish());
    out
}

/// The content and calls the events add up to.
fn joined(events: &[ToolEvent]) -> (String, Vec<(String, String)>) {
    let mut content = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Text(t) => content.push_str(t),
            ToolEvent::Start { index, name } => {
                assert_eq!(*index, calls.len());
                calls.push((name.clone(), String::new()));
            }
            ToolEvent::Args { index, text } => calls[*index].1.push_str(text),
        }
    }
    (content, calls)
}

/// Every way of cutting `text` into two and three pieces gives the same content and calls.
fn split_everywhere(format: ToolFormat, text: &str) -> (String, Vec<(String, String)>) {
    let whole = joined(&events(format, &[text]));
    let cuts: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    for &a in &cuts {
        let two = joined(&events(format, &[&text[..a], &text[a..]]));
        assert_eq!(two, whole, "cut at {a}");
        for &b in cuts.iter().filter(|&&b| b >= a).step_by(7) {
            let three = joined(&events(format, &[&text[..a], &text[a..b], &text[b..]]));
            assert_eq!(three, whole, "cuts at {a}, {b}");
        }
    }
    whole
}

#[test]
fn hermes_calls_are_parsed_in_any_pieces() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
    let (content, calls) = split_everywhere(ToolFormat::Hermes, text);
    assert_eq!(content, "Let me check.");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].0, "get_weather");
    let args: Value = serde_json::from_str(&calls[0].1).unwrap();
    assert_eq!(args, json!({"city": "Paris", "days": [1, 2]}));
    assert_eq!(calls[1], ("now".to_string(), "{}".to_string()));
}

#[test]
fn hermes_arguments_stream_in_pieces() {
    let pieces = [
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\"",
        ": 1, \"b\": ",
        "\"x}\"}",
        "}\n</tool_",
        "call>",
    ];
    let ev = events(ToolFormat::Hermes, &pieces);
    let args: Vec<&str> = ev
        .iter()
        .filter_map(|e| match e {
            ToolEvent::Args { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(args.len() >= 3, "{ev:?}");
    assert_eq!(args.concat(), "{\"a\": 1, \"b\": \"x}\"}");
    assert_eq!(
        ev[0],
        ToolEvent::Start {
            index: 0,
            name: "f".into()
        }
    );
}

#[test]
fn markup_never_leaks_into_content() {
    // a text that only looks like the beginning of a marker is released at the end
    let (content, calls) = split_everywhere(ToolFormat::Hermes, "a < b and <tool");
    assert_eq!(content, "a < b and <tool");
    assert!(calls.is_empty());
    // a block that is not a call is content, as written
    let (content, calls) =
        split_everywhere(ToolFormat::Hermes, "x <tool_call>not json</tool_call>");
    assert_eq!(content, "x<tool_call>not json</tool_call>");
    assert!(calls.is_empty());
    // a call cut by the length: what was written of its arguments
    let (content, calls) = joined(&events(
        ToolFormat::Hermes,
        &["<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1"],
    ));
    assert_eq!(content, "");
    assert_eq!(calls, vec![("f".to_string(), "{\"a\": 1".to_string())]);
}

#[test]
fn llama3_json_and_mistral_calls() {
    let (content, calls) = split_everywhere(
        ToolFormat::Llama3Json,
        "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": 1}}; {\"name\": \"g\", \"parameters\": {}}",
    );
    assert_eq!(content, "");
    assert_eq!(
        calls,
        vec![("f".into(), "{\"x\": 1}".into()), ("g".into(), "{}".into())]
    );
    let (content, calls) = split_everywhere(ToolFormat::Llama3Json, "Hello {there}");
    assert_eq!((content.as_str(), calls.len()), ("Hello {there}", 0));
    let (content, calls) = split_everywhere(ToolFormat::Llama3Json, "{not a call}");
    assert_eq!((content.as_str(), calls.len()), ("{not a call}", 0));
    let (content, calls) = split_everywhere(
        ToolFormat::Mistral,
        "Sure.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\": \"y\"}}]",
    );
    assert_eq!(content, "Sure.");
    assert_eq!(calls, vec![("f".into(), "{\"x\": \"y\"}".into())]);
}

#[test]
fn formats_are_detected_from_templates() {
    assert_eq!(
        ToolFormat::detect("{{ '<tool_call>' }}"),
        Some(ToolFormat::Hermes)
    );
    assert_eq!(
        ToolFormat::detect("[TOOL_CALLS] {{ x }}"),
        Some(ToolFormat::Mistral)
    );
    assert_eq!(
        ToolFormat::detect("<|python_tag|>"),
        Some(ToolFormat::Llama3Json)
    );
    assert_eq!(ToolFormat::detect("{{ messages }}"), None);
    assert_eq!(ToolFormat::Mistral.call_id().len(), 9);
    assert!(ToolFormat::Hermes.call_id().starts_with("call_"));
}

#[test]
fn tools_and_choices_are_checked() {
    let tools = parse_tools(
        &json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    )
    .unwrap();
    assert_eq!(tools[0].name, "f");
    assert!(parse_tools(&json!([{"type": "code"}]))
        .unwrap_err()
        .contains("tools[0].type"));
    assert!(
        parse_tools(&json!([{"type": "function", "function": {"name": "f", "x": 1}}]))
            .unwrap_err()
            .contains("function.x")
    );
    assert_eq!(parse_choice(None, &tools).unwrap(), ToolChoice::Auto);
    assert_eq!(parse_choice(None, &[]).unwrap(), ToolChoice::None);
    assert_eq!(
        parse_choice(Some(&json!("required")), &tools).unwrap(),
        ToolChoice::Required
    );
    assert_eq!(
        parse_choice(
            Some(&json!({"type": "function", "function": {"name": "f"}})),
            &tools
        )
        .unwrap(),
        ToolChoice::Function("f".into())
    );
    assert!(parse_choice(
        Some(&json!({"type": "function", "function": {"name": "g"}})),
        &tools
    )
    .is_err());
    assert!(parse_choice(Some(&json!("always")), &tools).is_err());
}

#[test]
fn forced_grammars_name_special_markers_by_id() {
    let tools = vec![Tool {
        name: "f".into(),
        parameters: json!({"type": "object"}),
    }];
    let GrammarSpec::Lark(g) = forced_grammar(ToolFormat::Hermes, &tools, false, &|_| None) else {
        panic!()
    };
    assert!(g.contains("\"<tool_call>\" \"\\n\" %json"), "{g}");
    let GrammarSpec::Lark(g) = forced_grammar(ToolFormat::Mistral, &tools, true, &|t| {
        (t == "[TOOL_CALLS]").then_some(5)
    }) else {
        panic!()
    };
    assert!(g.starts_with("start: <[5]> %json"), "{g}");
    assert!(!g.contains("maxItems"), "{g}");
}

#[test]
fn fallback_messages_describe_tools_and_earlier_calls() {
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let messages = vec![
        json!({"role": "user", "content": "hi"}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "42"}),
    ];
    let out = fallback_messages(&messages, Some(&tools));
    assert_eq!(out[0]["role"], "system");
    assert!(out[0]["content"]
        .as_str()
        .unwrap()
        .contains("\"name\":\"f\""));
    assert_eq!(
        out[2]["content"],
        "<tool_call>\n{\"name\":\"f\",\"arguments\":{\"a\":1}}\n</tool_call>"
    );
    assert_eq!(
        out[3],
        json!({"role": "user", "content": "<tool_response>\n42\n</tool_response>"})
    );
}

#[test]
fn json_call_sequences_stream_their_arguments() {
    let pieces = [
        "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\"",
        ": [1, {\"b\": \"}\"}]",
        "}}, {\"name\": \"g\", ",
        "\"arguments\": {}}]",
    ];
    let ev = events(ToolFormat::Mistral, &pieces);
    let (content, calls) = joined(&ev);
    assert_eq!(content, "");
    assert_eq!(
        calls,
        vec![
            ("f".into(), "{\"a\": [1, {\"b\": \"}\"}]}".into()),
            ("g".into(), "{}".into())
        ]
    );
    let pieces_of_f = ev
        .iter()
        .filter(|e| matches!(e, ToolEvent::Args { index: 0, .. }))
        .count();
    assert!(pieces_of_f >= 2, "{ev:?}");
}

#[test]
fn only_offered_functions_are_calls() {
    let names = vec!["get_weather".to_string()];
    let answer = "{\"name\": \"Bob\", \"parameters\": {\"age\": 3}}";
    let mut p = ToolParser::offering(ToolFormat::Llama3Json, names.clone());
    let mut ev = p.push(answer);
    ev.extend(p.finish());
    assert_eq!(joined(&ev), (answer.to_string(), vec![]));
    let mut p = ToolParser::offering(ToolFormat::Hermes, names);
    let mut ev = p.push("<tool_call>\n{\"name\": \"other\", \"arguments\": {}}\n</tool_call>");
    ev.extend(p.finish());
    assert!(joined(&ev).1.is_empty());
}
