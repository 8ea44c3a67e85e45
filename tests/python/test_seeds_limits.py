"""Seeds and limits of generative models, over HTTP against a real server.

- A request with a `seed` and a temperature above zero answers the same text alone and while
  sharing the running batch with other requests: different prompts, prompts long enough to be
  computed in pieces (`max_step_tokens = 16` here), and requests sharing its long system prompt.
  Two families (Llama with grouped-query attention, Qwen2 with biased projections).
- With `max_decode_slowdown` (prompt pieces sized by time beside decoding sequences, at least
  one block each), long prompts arriving while others decode are answered, each with the same
  text as the same checkpoint gives them alone under a plain token budget.
- A prompt and `max_tokens` that the KV cache can never hold (`kv_cache_tokens` below the
  context length) is a 400 at admission naming the cache, not a request that waits forever; a
  prompt longer than the context is a 400 naming the context."""

import concurrent.futures
import os
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
FAMILIES = ["llama-gqa", "qwen2"]

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "llama-gqa" / "config.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    repo = tmp_path_factory.mktemp("seeds-repo")
    for name in FAMILIES:
        (repo / name).mkdir()
        # small steps: a 100-token prompt is computed over 7 of them, beside running sequences
        (repo / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / name}"\n'
            "kv_cache_tokens = 4096\nmax_step_tokens = 16\n")
    # the same checkpoint, its prompts cut by time beside decoding sequences
    (repo / "paced").mkdir()
    (repo / "paced" / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / "llama-gqa"}"\n'
        "kv_cache_tokens = 4096\nmax_decode_slowdown = 1.2\n")
    (repo / "tiny-kv").mkdir()
    (repo / "tiny-kv" / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / "llama-gqa"}"\n'
        "kv_cache_tokens = 64\nblock_size = 16\n")
    s = Server(repo)
    yield s
    s.stop()


def complete(gen, model, prompt, **extra):
    r = httpx.post(gen.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 24, "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def chat(gen, model, system, user, **extra):
    r = httpx.post(gen.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 24, "ignore_eos": True, **extra,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def prompt_of(i, length):
    return [(7 * i + 13 * k) % 40000 + 100 for k in range(length)]


@pytest.mark.parametrize("model", FAMILIES)
def test_a_seed_gives_the_same_text_whatever_shares_the_batch(gen, model):
    mine = prompt_of(0, 100)  # chunked: 100 tokens over steps of 16
    seeded = dict(temperature=1.0, top_p=0.95, seed=1234)
    alone = complete(gen, model, mine, **seeded)
    assert alone == complete(gen, model, mine, **seeded)
    # another seed samples another text (so the comparison below means something)
    assert complete(gen, model, mine, temperature=1.0, top_p=0.95, seed=99) != alone
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        # short and long prompts, greedy and sampled with other seeds, arriving around mine
        others = [pool.submit(complete, gen, model, prompt_of(i, 5 + 37 * (i % 4)),
                              temperature=0.8 * (i % 2), seed=i, max_tokens=10 + i)
                  for i in range(1, 6)]
        crowded = [pool.submit(complete, gen, model, mine, **seeded) for _ in range(2)]
        others += [pool.submit(complete, gen, model, prompt_of(i, 60 + i), temperature=1.0,
                               seed=i) for i in range(6, 11)]
        assert [c.result() for c in crowded] == [alone, alone]
        for o in others:
            o.result()


@pytest.mark.parametrize("model", FAMILIES)
def test_a_seed_gives_the_same_text_beside_requests_sharing_its_system_prompt(gen, model):
    system = " ".join(f"Rule {k}: answer politely and keep to the point." for k in range(12))
    seeded = dict(temperature=1.0, seed=77)
    a_alone = chat(gen, model, system, "What is a cat?", **seeded)
    b_alone = chat(gen, model, system, "What is a dog?", **seeded)
    assert a_alone != b_alone
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        a = [pool.submit(chat, gen, model, system, "What is a cat?", **seeded) for _ in range(3)]
        b = [pool.submit(chat, gen, model, system, "What is a dog?", **seeded) for _ in range(3)]
        assert [f.result() for f in a] == [a_alone] * 3
        assert [f.result() for f in b] == [b_alone] * 3
    # and again after them (cached prefix blocks, where the server keeps them)
    assert chat(gen, model, system, "What is a cat?", **seeded) == a_alone


def test_prompts_paced_beside_decoding_get_the_same_text(gen):
    prompts = [prompt_of(20 + i, 120 + 20 * i) for i in range(4)]
    kinds = [dict(temperature=0), dict(temperature=1.0, seed=5)]
    reference = [[complete(gen, "llama-gqa", p, **k) for k in kinds] for p in prompts]
    # one request first, so that the pace knows a prompt's and a decode step's costs
    complete(gen, "paced", prompt_of(3, 40))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        # short prompts decoding long answers, the long prompts arriving among them
        streams = [pool.submit(complete, gen, "paced", prompt_of(i, 5), max_tokens=120)
                   for i in range(8)]
        paced = [[pool.submit(complete, gen, "paced", p, **k) for k in kinds] for p in prompts]
        assert [[f.result() for f in row] for row in paced] == reference
        for f in streams:
            f.result()


def test_more_than_the_kv_cache_can_ever_hold_is_400_at_admission_naming_it(gen):
    # 64 tokens of KV cache, context 256: 40 + 30 can never be computed
    r = httpx.post(gen.url + "/v1/completions", timeout=30, json={
        "model": "tiny-kv", "prompt": prompt_of(1, 40), "max_tokens": 30})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens", err
    assert "KV cache" in err["message"] and "kv_cache_tokens" in err["message"], err
    assert "64" in err["message"] and "70" in err["message"], err
    # a prompt that fills the cache alone: named as the prompt's fault
    r = httpx.post(gen.url + "/v1/completions", timeout=30, json={
        "model": "tiny-kv", "prompt": prompt_of(1, 64), "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "KV cache" in r.text
    # what fits is answered, to the last position of the cache
    assert len(complete(gen, "tiny-kv", prompt_of(1, 40), max_tokens=24, temperature=0)) > 0
    # without max_tokens the answer is bounded by what the cache leaves, not refused
    r = httpx.post(gen.url + "/v1/completions", timeout=60, json={
        "model": "tiny-kv", "prompt": prompt_of(2, 40), "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 24


def test_a_prompt_longer_than_the_context_is_400_naming_the_context(gen):
    r = httpx.post(gen.url + "/v1/completions", timeout=30, json={
        "model": "llama-gqa", "prompt": prompt_of(3, 300), "max_tokens": 1})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "context length is 256" in message and "300" in message, message
