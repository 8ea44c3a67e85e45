"""Prefix caching over real HTTP: the same answers with the cache on and off (greedy, several
families, prompts sharing a long prefix, a conversation growing turn by turn, several choices),
what the metrics count, and the cache giving its blocks up under pressure.

Each fixture checkpoint is served twice: as itself (prefix caching on, the default) and as
`<name>-nocache` (`prefix_caching = false`)."""

import concurrent.futures
import json
import os
import re
import urllib.request
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
FAMILIES = ["llama-gqa", "mistral", "qwen2", "qwen3", "smollm2-135m-instruct"]

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "llama-gqa" / "config.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    repo = tmp_path_factory.mktemp("prefix-repo")
    for name in FAMILIES:
        for served, extra in [(name, ""), (f"{name}-nocache", "prefix_caching = false\n")]:
            (repo / served).mkdir()
            (repo / served / "model.toml").write_text(
                'kind = "text-generation"\n[generation]\n'
                f'checkpoint = "{FIXTURES / name}"\nkv_cache_tokens = 4096\n{extra}')
    tight = repo / "tight"
    tight.mkdir()
    # 24 blocks of 16: a few sequences fill it, so cached blocks must make room
    (tight / "model.toml").write_text(
        'kind = "text-generation"\n[generation]\n'
        f'checkpoint = "{FIXTURES / "llama-gqa"}"\nkv_cache_tokens = 384\nmax_sequences = 4\n')
    s = Server(repo)
    yield s
    s.stop()


def complete(gen, model, prompt, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, **extra}
    r = httpx.post(gen.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def metric(gen, name, model):
    text = urllib.request.urlopen(gen.url + "/metrics").read().decode()
    pattern = rf'^{name}\{{model="{re.escape(model)}",version="1"\}} (\S+)$'
    found = re.search(pattern, text, re.M)
    assert found, f"{name} for {model} not exported"
    return float(found.group(1))


def hits(gen, model):
    return (metric(gen, "aiaas_generation_prefix_cache_hit_tokens_total", model),
            metric(gen, "aiaas_generation_prefix_cache_queried_tokens_total", model))


# a 70-token "system prompt" every request begins with, then each one's own question
SYSTEM = [(7 * k + 3) % 500 + 10 for k in range(70)]
QUESTIONS = [[100 + i, 200 + 2 * i, 300 + 3 * i, 17] for i in range(4)]


def chat(gen, model, messages):
    r = httpx.post(gen.url + "/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": 12, "temperature": 0,
        "logprobs": True}, timeout=120)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"], [t["logprob"] for t in c["logprobs"]["content"]]


def conversation(gen, model):
    """Three turns of a chat: each turn's prompt is the last one, its answer and a question."""
    messages = [{"role": "system", "content": "You answer questions about the weather, "
                 "briefly and politely, in the words of a ship's log. " * 3}]
    said = []
    for question in ["Will it rain today?", "And tomorrow morning?", "Should I sail then?"]:
        messages.append({"role": "user", "content": question})
        text, logprobs = chat(gen, model, messages)
        said.append((text, logprobs))
        messages.append({"role": "assistant", "content": text})
    return said


@pytest.mark.parametrize("name", FAMILIES)
def test_answers_are_the_same_with_the_cache_on_and_off(gen, name):
    def answers(model):
        out = []
        for q in QUESTIONS:
            c = complete(gen, model, SYSTEM + q, logprobs=0)["choices"][0]
            out.append((c["text"], c["logprobs"]["token_logprobs"]))
        return out + conversation(gen, model)

    before = hits(gen, name)
    on, off = answers(name), answers(f"{name}-nocache")
    assert [t for t, _ in on] == [t for t, _ in off], name
    for (text, a), (_, b) in zip(on, off):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3, (name, text)
    hit, queried = (x - y for x, y in zip(hits(gen, name), before))
    # three questions after the first found the system prompt's 4 whole blocks of 16, and
    # the conversation's second and third turns the turns before them
    assert hit >= 3 * 64 + 2 * 16, (hit, queried)
    assert hit < queried
    assert hits(gen, f"{name}-nocache")[0] == 0


def test_several_choices_share_their_prompt(gen):
    model = "qwen2"
    prompt = SYSTEM + [5, 6, 7]
    before = hits(gen, model)
    r = complete(gen, model, prompt, n=3, temperature=1.0, seed=3)
    assert len(r["choices"]) == 3
    hit, queried = (x - y for x, y in zip(hits(gen, model), before))
    # the first choice computes the prompt (or finds it cached); the other two find its
    # 4 whole blocks
    assert queried == 3 * len(prompt)
    assert hit >= 2 * 64, hit
    # and each choice is its own: seeded choices differ from each other
    assert len({c["text"] for c in r["choices"]}) > 1


def test_a_full_pool_gives_cached_blocks_up_and_answers_stay_right(gen):
    model = "tight"
    prompts = [SYSTEM[:40] + [11 * i + 1, 12, 13] for i in range(8)]
    alone = [complete(gen, model, p, max_tokens=30)["choices"][0]["text"] for p in prompts[:2]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: complete(gen, model, p, max_tokens=30), prompts))
    assert [r["choices"][0]["text"] for r in results[:2]] == alone
    info = json.load(urllib.request.urlopen(f"{gen.url}/v1/models/{model}"))
    state = info["versions"][0]["generation"]["scheduler"]
    assert state["blocks_cached"] <= state["blocks_total"]
    assert state["blocks_cached"] > 0
