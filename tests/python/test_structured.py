"""Structured output and tool calling through OpenAI's chat and completions APIs, with the
official `openai` client and raw HTTP: JSON schemas, regular expressions, choices and Lark
grammars enforced while decoding (the answer of a request that finishes by `stop` validates
against its schema, checked with `jsonschema`, on the real SmolLM2 and on random-weight models
where nothing but the mask makes it valid), refusals of what cannot be enforced, and OpenAI tool
calls, whole and streamed, with their results fed back."""

import json
import os
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
SMOL = "smollm2-135m-instruct"
RANDOM = ["llama-gqa", "qwen2"]

pytestmark = pytest.mark.skipif(
    not (FIXTURES / SMOL / "reference.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    repo = tmp_path_factory.mktemp("structured-repo")
    for name in RANDOM + [SMOL]:
        (repo / name).mkdir()
        (repo / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / name}"\n')
    # the same random checkpoint with the other tool-call formats set in model.toml
    for parser in ["mistral", "llama3_json"]:
        (repo / f"qwen3-{parser}").mkdir()
        (repo / f"qwen3-{parser}" / "model.toml").write_text(
            'kind = "text-generation"\n[generation]\n'
            f'checkpoint = "{FIXTURES / "qwen3"}"\ntool_call_parser = "{parser}"\n')
    s = Server(repo)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(gen):
    return openai.OpenAI(base_url=gen.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(gen, path, body):
    return httpx.post(gen.url + path, json=body, timeout=300)


# nested objects, arrays, enums, numbers with bounds, required fields
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

# bounded everywhere (no free number of decimals): a random model reaches the end
BOUNDED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "ok": {"type": "boolean"},
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                           "label": {"type": "string", "maxLength": 4}},
            "required": ["x", "label"],
            "additionalProperties": False,
        },
        "list": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["id", "kind", "ok", "point", "list"],
    "additionalProperties": False,
}


def schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def check_choices(choices, schema, text=lambda c: c.message.content):
    stopped = 0
    for c in choices:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            value = json.loads(text(c))
            jsonschema.validate(value, schema)
            stopped += 1
        else:
            # cut by max_tokens: honestly so, never a value passed off as complete
            with pytest.raises(ValueError):
                jsonschema.validate(json.loads(text(c)), schema)
    return stopped


def test_a_json_schema_is_followed_by_smollm2(client):
    messages = [{"role": "user", "content": "Describe a person called Ada who lives in Paris as JSON."}]
    r = client.chat.completions.create(model=SMOL, messages=messages, temperature=0, max_tokens=300,
                                       response_format=schema_format(PERSON))
    assert check_choices(r.choices, PERSON) == 1
    r = client.chat.completions.create(model=SMOL, messages=messages, temperature=1.0, seed=7, n=3,
                                       max_tokens=300, response_format=schema_format(PERSON))
    assert check_choices(r.choices, PERSON) >= 1


@pytest.mark.parametrize("model", RANDOM)
def test_random_weights_follow_a_schema_by_the_mask_alone(client, model):
    messages = [{"role": "user", "content": "JSON please"}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=1.0, seed=3, n=4,
                                       max_tokens=200, response_format=schema_format(BOUNDED))
    assert check_choices(r.choices, BOUNDED) >= 1
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_length_is_reported_when_max_tokens_cuts_the_value(client):
    r = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "A person"}],
                                       temperature=0, max_tokens=4, response_format=schema_format(PERSON))
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_a_streamed_structured_answer_is_the_whole_one(client):
    kwargs = dict(model=SMOL, messages=[{"role": "user", "content": "Describe Ada as JSON."}],
                  temperature=0, max_tokens=300, response_format=schema_format(PERSON))
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_vllm_guided_parameters_on_both_routes(gen, client):
    r = client.completions.create(model=SMOL, prompt="The answer is", max_tokens=20, temperature=1.0, seed=1,
                                  n=4, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert len(c.text) == 6 and c.text[:3].isdigit() and c.text[3] == "-" and c.text[4:].islower()
    choices = ["yes", "no", "maybe so"]
    for model in [SMOL] + RANDOM:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Well?"}], n=3,
                                           temperature=1.0, seed=2, max_tokens=10,
                                           extra_body={"guided_choice": choices})
        assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)
        r = post(gen, "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 10,
                                          "structured_outputs": {"choice": choices}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in choices
    grammar = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/\n'
    r = client.completions.create(model=RANDOM[0], prompt="x", max_tokens=20, temperature=1.0, seed=5, n=3,
                                  extra_body={"guided_grammar": grammar})
    for c in r.choices:
        greeting, name = c.text.split(" ")
        assert greeting in ("hello", "hi") and name[0].isupper() and name[1:].islower(), c.text
    r = client.completions.create(model=RANDOM[1], prompt="x", max_tokens=200, temperature=0,
                                  extra_body={"guided_json": BOUNDED})
    assert check_choices(r.choices, BOUNDED, text=lambda c: c.text) == 1
    r = post(gen, "/v1/completions", {"model": RANDOM[1], "prompt": "x", "max_tokens": 200,
                                      "structured_outputs": {"json": json.dumps(BOUNDED)}})
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), BOUNDED)


def test_what_cannot_be_enforced_is_refused_naming_it(gen, client):
    base = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}]}
    for schema, keyword in [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(response_format=schema_format(schema), **base)
        body = e.value.body
        assert body["param"] == "response_format" and keyword in body["message"], body
    cases = [
        ({"response_format": schema_format({"type": "object"}), "stop": ["}"]}, "stop"),
        ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"guided_json": {"type": "string", "maxLength": 10 ** 6, "pattern": "a" * 70000}}, "guided_json"),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ]
    for extra, param in cases:
        r = post(gen, "/v1/chat/completions", {**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time in a timezone",
                 "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                "required": ["tz"], "additionalProperties": False}},
}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# the random models' context is 256 tokens: one short tool
SHORT = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}},
}


def tools_for(model):
    return TOOLS if model == SMOL else [SHORT]
ASK = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]


def check_calls(message, names=PARAMS):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert "<tool_call>" not in (message.content or "")


def test_a_required_call_validates_on_smollm2(client):
    r = client.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=200)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    check_calls(c.message)
    assert c.message.content is None


@pytest.mark.parametrize("model", RANDOM + ["qwen3-mistral", "qwen3-llama3_json"])
def test_a_named_call_validates_on_random_weights(client, model):
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=tools_for(model), temperature=1.0, seed=11, n=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    called = 0
    for c in r.choices:
        if c.finish_reason == "tool_calls":
            called += 1
            check_calls(c.message, names=["get_weather"])
        else:
            assert c.finish_reason == "length"
    assert called >= 1


@pytest.mark.parametrize("model", [SMOL, RANDOM[0], "qwen3-mistral"])
def test_a_streamed_call_is_the_whole_one(client, model):
    kwargs = dict(model=model, messages=ASK, tools=tools_for(model), temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs)
    if model == SMOL:
        assert whole.choices[0].finish_reason == "tool_calls"
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    calls = {}
    finishes = []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        assert not delta.content, "call markup in the content"
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                # the first delta of a call: its id, type and name, once
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {"name": tc.function.name, "arguments": tc.function.arguments or "", "pieces": 0}
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
                calls[tc.index]["pieces"] += 1
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    # a random model may fill its 256-token context before the call's closing markup: then
    # both say "length", with the same arguments so far
    assert finishes == [whole.choices[0].finish_reason]
    expected = whole.choices[0].message.tool_calls
    assert [c["name"] for c in calls.values()] == [c.function.name for c in expected]
    assert [c["arguments"] for c in calls.values()] == [c.function.arguments for c in expected]
    if model == SMOL:
        # hermes arguments stream as they are written
        assert calls[0]["pieces"] > 1


def test_auto_mode_keeps_markup_out_of_the_content(client):
    for stream in [False, True]:
        r = client.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=150, stream=stream)
        if stream:
            text = ""
            for chunk in r:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        else:
            text = r.choices[0].message.content or ""
            if r.choices[0].message.tool_calls:
                check_calls(r.choices[0].message)
                assert r.choices[0].finish_reason == "tool_calls"
        assert "<tool_call>" not in text and "</tool_call>" not in text


def test_tool_results_are_fed_back(client):
    first = client.chat.completions.create(model=SMOL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    for model in [SMOL, RANDOM[0]]:
        plain = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=1)
        r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=30)
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason in ("stop", "length")
        # the call and its result are in the prompt
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_bad_tools_are_refused_naming_the_parameter(gen):
    base = {"model": SMOL, "messages": ASK}
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ]
    for extra, param in cases:
        r = post(gen, "/v1/chat/completions", {**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.text)
    r = post(gen, "/v1/completions", {"model": SMOL, "prompt": "x", "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
