"""Generative models through OpenAI's chat and completions APIs, with the official `openai`
client and raw HTTP: answers compared token for token with transformers' greedy `generate`
(reference.json of each fixture checkpoint), streaming, choices, log-probabilities, stop
strings, parameter errors, batch invariance, cancellation and stalled readers.

The repository holds the fixture checkpoints (`make llm-fixtures`) as they are, each with its
one-line model.toml, and one model with a deliberately small KV cache and stream buffer."""

import concurrent.futures
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
TINY = ["llama-gqa", "llama-tied", "llama-sharded", "mistral", "qwen2", "qwen3"]
SMOL = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not (FIXTURES / SMOL / "reference.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


def reference(name):
    return json.loads((FIXTURES / name / "reference.json").read_text())


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    repo = tmp_path_factory.mktemp("gen-repo")
    for name in TINY + [SMOL]:
        # the checkpoint folders live outside the repository (links out of it are refused)
        (repo / name).mkdir()
        (repo / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / name}"\n')
    small = repo / "small-kv"
    small.mkdir()
    (small / "model.toml").write_text(
        'kind = "text-generation"\n'
        "[generation]\n"
        f'checkpoint = "{FIXTURES / "llama-gqa"}"\n'
        "kv_cache_tokens = 256\n"
        "max_sequences = 8\n"
        "max_waiting = 4\n"
        "stream_buffer = 4\n"
        "stall_timeout_s = 2\n"
    )
    s = Server(repo)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(gen):
    return openai.OpenAI(base_url=gen.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(gen, path, body, timeout=120):
    return httpx.post(gen.url + path, json=body, timeout=timeout)


def scheduler(gen, model):
    with urllib.request.urlopen(f"{gen.url}/v1/models/{model}") as r:
        d = json.load(r)
    return d["versions"][0]["generation"]["scheduler"]


def wait_idle(gen, model, within=30):
    deadline = time.time() + within
    while time.time() < deadline:
        s = scheduler(gen, model)
        if s["running"] == 0 and s["waiting"] == 0 and s["blocks_used"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"{model} still busy: {scheduler(gen, model)}")


@pytest.mark.parametrize("name", TINY + [SMOL])
def test_greedy_answers_equal_transformers_generate(gen, name):
    ref = reference(name)
    for p in ref["prompts"]:
        greedy = p["greedy"]
        stopped = p["greedy_stopped_on_eos"]
        r = post(gen, "/v1/completions", {
            "model": name, "prompt": p["input_ids"], "max_tokens": len(greedy),
            "temperature": 0, "logprobs": 0,
        })
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want_text = p["greedy_text"]
        if stopped:
            # the answer ends at the end-of-sequence token, which is not part of its text
            want_text = want_text[: want_text.rfind("<|")] if "<|" in want_text else want_text
        assert choice["text"] == want_text, (name, p["name"])
        assert choice["finish_reason"] == ("stop" if stopped else "length")
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(p["input_ids"])
        assert usage["completion_tokens"] == len(greedy)
        assert len(choice["logprobs"]["tokens"]) == len(greedy) - (1 if stopped else 0)


def test_chat_with_the_openai_client_answers_the_question(gen, client):
    ref = next(p for p in reference(SMOL)["prompts"] if p["name"] == "chat")
    r = client.chat.completions.create(
        model=SMOL, messages=ref["messages"], temperature=0, max_tokens=30)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(ref["input_ids"])
    assert r.usage.completion_tokens == len(ref["greedy"])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_a_stream_says_what_the_whole_answer_says(gen, client):
    for content in ["What is the capital of France?", "请用中文介绍一下巴黎。"]:
        messages = [{"role": "user", "content": content}]
        whole = client.chat.completions.create(
            model=SMOL, messages=messages, temperature=0, max_tokens=40)
        chunks = list(client.chat.completions.create(
            model=SMOL, messages=messages, temperature=0, max_tokens=40, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        # no character is broken between deltas; an answer cut by max_tokens in the middle of
        # a character ends with the replacement character, streamed or not
        assert "\ufffd" not in text.rstrip("\ufffd")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert all(c.usage is None for c in chunks[:-1])


def test_the_raw_stream_is_server_sent_events_ending_in_done(gen):
    body = {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", gen.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = post(gen, "/v1/completions", {**body, "stream": False}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_completions_with_echo_and_several_prompts(gen, client):
    r = client.completions.create(
        model=SMOL, prompt=["The capital of France is", "One, two, three,"],
        max_tokens=5, temperature=0, echo=True)
    assert len(r.choices) == 2
    assert r.choices[0].text.startswith("The capital of France is")
    assert r.choices[1].text.startswith("One, two, three,")
    assert len(r.choices[0].text) > len("The capital of France is")


def test_several_choices_and_a_seed(gen, client):
    args = dict(model=SMOL, messages=[{"role": "user", "content": "Name a colour."}],
                max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**args)
    b = client.chat.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1, "each choice samples on its own"


def test_logprobs_are_the_model_distribution(gen, client):
    r = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob
        assert t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    c = client.completions.create(model=SMOL, prompt="The capital of France is",
                                  max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_a_stop_string_spanning_tokens_is_cut_exactly(gen, client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # "The capital of France is Paris.": " of" and " France" are separate tokens
    r = client.chat.completions.create(model=SMOL, messages=messages, temperature=0,
                                       max_tokens=30, stop=["of Fr"])
    assert r.choices[0].message.content == "The capital "
    assert r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model=SMOL, messages=messages, temperature=0,
                                            max_tokens=30, stop=["of Fr"], stream=True)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == "The capital "
    assert not any("of" in d for d in deltas)


def test_an_unknown_model_is_404_in_openai_shape(gen, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["param"] == "model"


def test_a_prompt_beyond_the_context_is_400_naming_both_numbers(gen, client):
    context = 256  # llama-gqa's max_position_embeddings
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama-gqa", prompt=[5] * 200, max_tokens=100)
    message = e.value.body["message"]
    assert str(context) in message and "200" in message and "100" in message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama-gqa", prompt=[5] * 300, max_tokens=1)
    assert "300" in e.value.body["message"]


@pytest.mark.parametrize("param,value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5),
    ("top_logprobs", 21), ("stop", ["a", "b", "c", "d", "e"]), ("n", 17), ("n", 0),
    ("logit_bias", {"49152": 1}), ("logit_bias", {"5": 101}), ("max_tokens", 0),
    ("max_tokens", 10**6), ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("min_p", 1.5), ("stream_options", {"include_usage": True}), ("tools", []),
    ("response_format", {"type": "yaml"}), ("tool_choice", "required"), ("best_of", 2),
])
def test_out_of_range_or_unsupported_parameters_are_400_naming_them(gen, param, value):
    body = {"model": "llama-gqa", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, param: value}
    if param == "top_logprobs":
        body["logprobs"] = True
    r = post(gen, "/v1/chat/completions", body)
    assert r.status_code == 400, (param, value, r.text)
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_the_predict_route_points_a_generative_model_to_the_chat_routes(gen):
    r = post(gen, "/v1/models/llama-gqa/predict", {"instances": ["hi"]})
    assert r.status_code == 422 and "chat/completions" in r.text


def test_answers_do_not_depend_on_the_batch(gen):
    prompts = [[1 + i, 100 + 3 * i, 7, 2000 + i] for i in range(31)]

    def complete(ids, **extra):
        r = post(gen, "/v1/completions", {"model": "llama-gqa", "prompt": ids, "max_tokens": 16,
                                          "ignore_eos": True, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = complete(prompts[0], temperature=0)
    sampled_alone = complete(prompts[0], temperature=1.0, seed=11)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        crowd = [pool.submit(complete, p, temperature=0) for p in prompts[1:]]
        crowd += [pool.submit(complete, p, temperature=1.0, seed=5) for p in prompts[1:]]
        mine = pool.submit(complete, prompts[0], temperature=0)
        sampled = pool.submit(complete, prompts[0], temperature=1.0, seed=11)
        assert mine.result() == alone
        assert sampled.result() == sampled_alone
        for c in crowd:
            c.result()


def test_a_client_that_leaves_frees_its_blocks(gen):
    model = "small-kv"
    wait_idle(gen, model)
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", gen.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert scheduler(gen, model)["blocks_used"] > 0
    # the connection is closed: the sequence ends within a step
    wait_idle(gen, model, within=10)
    # and a whole answer whose client hangs up mid-way
    with pytest.raises(httpx.ReadTimeout):
        post(gen, "/v1/completions", {**body, "stream": False, "max_tokens": 240}, timeout=0.05)
    wait_idle(gen, model, within=10)


def test_a_pool_too_small_for_everyone_preempts_and_answers_every_request_unchanged(gen):
    # 256 tokens of KV (16 blocks): eight sequences growing to 100 tokens each cannot all fit
    ids = [[9 + i, 40 + i, 3] for i in range(8)]

    def complete(p):
        r = post(gen, "/v1/completions", {"model": "small-kv", "prompt": p, "max_tokens": 90,
                                          "ignore_eos": True, "temperature": 0})
        return r

    alone = [complete(p).json()["choices"][0]["text"] for p in ids[:2]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(complete, ids))
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 503]
    assert len(ok) + len(refused) == 8, [r.text for r in results]
    assert all(r.headers.get("retry-after") for r in refused)
    # whatever was answered is what it answers alone, preempted and recomputed or not
    for p, r in zip(ids, results):
        if r.status_code == 200 and p in ids[:2]:
            assert r.json()["choices"][0]["text"] == alone[ids.index(p)]
    metrics = urllib.request.urlopen(gen.url + "/metrics").read().decode()
    assert "aiaas_generation_preemptions_total" in metrics
    wait_idle(gen, "small-kv")


def test_streams_nobody_reads_do_not_stop_other_requests(gen):
    model = "small-kv"
    wait_idle(gen, model)
    host, port = gen.addr.rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": [5, 6], "max_tokens": 250,
                       "ignore_eos": True, "stream": True})
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    stalled = []
    for _ in range(4):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect((host, int(port)))
        s.sendall(request)
        stalled.append(s)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda i: post(gen, "/v1/completions", {
                "model": model, "prompt": [11, i + 1], "max_tokens": 8, "temperature": 0,
            }, timeout=60), range(4)))
        assert all(r.status_code == 200 for r in done), [r.text for r in done]
        # the unread streams end: paused past the stall bound, or finished into the buffers
        wait_idle(gen, model, within=60)
    finally:
        for s in stalled:
            s.close()
