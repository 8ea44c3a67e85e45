"""Weights and KV cache under one memory budget: a decoder's KV pool (on the CPU) starts at a
sixteenth of its size, grows by chunks as its sequences need blocks and the budget has room,
and gives back the blocks no sequence holds when another model needs the room, before any model
is evicted.

SmolLM2-135M with `kv_cache_tokens = 32768` (1.4 GiB at most, chunks of 2,048 tokens, 90 MiB):
eight 600-token prompts at once need three chunks. A first server, without a budget, measures
what SmolLM2 and a tiny checkpoint hold once loaded; the second has a budget with room for
SmolLM2 and two chunks more, and half of the tiny one.

Under a budget that holds SmolLM2 (`kv_cache_tokens = 4096`, chunks of 256 tokens) and two and
a half chunks more, its KV cache can never hold more than the budget less its weights: a prompt
and `max_tokens` beyond that (within `kv_cache_tokens` and the context) is a 400 at admission
naming the budget, not a wait until the deadline, and one exactly at it is answered. Models that
are never evicted (all of them without lazy model control) count against it: with a second one
loaded beside SmolLM2 the ceiling is lower, and it rises when that one is unloaded."""

import concurrent.futures
import json
import os
import urllib.request
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
SMOL = "smollm2-135m-instruct"
CHUNK = 2048 * 30 * 2 * 3 * 64 * 4  # tokens x layers x (k, v) x kv heads x head dim x fp32

pytestmark = pytest.mark.skipif(
    not (FIXTURES / SMOL / "config.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


def repo(tmp_path):
    for name, checkpoint, tokens in [("smol", SMOL, 32768), ("tiny", "llama-gqa", 2048)]:
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / checkpoint}"\n'
            f"kv_cache_tokens = {tokens}\nmax_step_tokens = 2048\n")
    return tmp_path


def state(s, name):
    with urllib.request.urlopen(f"{s.url}/v1/models/{name}") as r:
        m = json.load(r)
    v = m["versions"][0] if m.get("versions") else {}
    return m["state"], v.get("memory_bytes", 0), v.get("generation", {}).get("scheduler", {})


def complete(s, model, prompt, max_tokens=4):
    r = httpx.post(s.url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_the_kv_pool_grows_within_the_budget_and_gives_back_before_anyone_is_evicted(tmp_path):
    probe = Server(repo(tmp_path / "a"), "--model-control", "lazy")
    try:
        complete(probe, "smol", [1, 2, 3])
        complete(probe, "tiny", [1, 2, 3])
        _, smol, sched = state(probe, "smol")
        _, tiny, _ = state(probe, "tiny")
        # the pool as loaded: its first chunk of 128 blocks, of 2,048
        assert (sched["blocks_total"], sched["blocks_max"]) == (128, 2048), sched
    finally:
        probe.stop()
    budget = smol + 2 * CHUNK + tiny // 2
    s = Server(repo(tmp_path / "b"), "--model-control", "lazy",
               "--model-memory-budget", str(budget))
    try:
        prompts = [[(97 * i + 7 * k) % 40000 + 100 for k in range(600)] for i in range(8)]
        alone = complete(s, "smol", prompts[0])
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: complete(s, "smol", p), prompts))
        assert together[0] == alone
        grown_state, grown, sched = state(s, "smol")
        # grew by its two chunks, and no further than the budget
        assert sched["blocks_total"] == 3 * 128, sched
        assert grown <= budget and grown >= smol + CHUNK
        # the tiny model needs more room than is left: SmolLM2's pool gives some back, and
        # nobody is evicted
        assert complete(s, "tiny", [5, 6, 7])
        smol_state, after, sched = state(s, "smol")
        assert smol_state == "ready"
        assert after < grown, (after, grown)
        assert sched["blocks_total"] < 3 * 128
        assert any("KV cache memory given back" in line for line in s.log), "".join(s.log[-20:])
        metrics = urllib.request.urlopen(s.url + "/metrics").read().decode()
        assert "aiaas_model_evictions_total" not in metrics or 'evictions_total{model="smol"}' not in metrics
        # and SmolLM2 grows again when it needs to, answering as before
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda p: complete(s, "smol", p), prompts))
        assert again == together
    finally:
        s.stop()


SMALL_CHUNK = 256 * 30 * 2 * 3 * 64 * 4  # kv_cache_tokens = 4096: chunks of 256 tokens


def test_what_the_budget_can_never_let_the_kv_cache_hold_is_400_at_admission(tmp_path):
    def one_model(root):
        (root / "smol").mkdir(parents=True)
        (root / "smol" / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / SMOL}"\n'
            "kv_cache_tokens = 4096\nmax_step_tokens = 2048\n")
        return root

    probe = Server(one_model(tmp_path / "a"))
    try:
        # weights and the pool's first chunk, as loaded
        _, smol, _ = state(probe, "smol")
    finally:
        probe.stop()
    budget = smol + 2 * SMALL_CHUNK + SMALL_CHUNK // 2
    s = Server(one_model(tmp_path / "b"), "--model-memory-budget", str(budget))
    try:
        with urllib.request.urlopen(f"{s.url}/v1/models/smol") as r:
            gen = json.load(r)["versions"][0]["generation"]
        ceiling = gen["kv_cache_tokens_budgeted"]
        # about three and a half chunks, in whole blocks: below the cache's size and the context
        assert gen["kv_cache_tokens"] == 4096 and gen["context_length"] == 8192, gen
        assert 3 * 256 <= ceiling < 4 * 256 and ceiling % gen["kv_block_size"] == 0, gen

        def post(path, body):
            return httpx.post(s.url + path, timeout=300, json={"model": "smol", **body})

        def prompt(n, seed=0):
            return [(97 * seed + 7 * k) % 40000 + 100 for k in range(n)]

        # beyond the ceiling: refused at once, the budget named
        r = post("/v1/completions", {"prompt": prompt(ceiling - 100), "max_tokens": 200})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens", err
        assert "memory budget" in err["message"] and "--model-memory-budget" in err["message"], err
        assert f"hold no more than {ceiling} tokens" in err["message"], err
        assert f"({ceiling + 100} in all)" in err["message"], err
        r = post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": ceiling})
        assert r.status_code == 400, r.text
        assert "memory budget" in r.json()["error"]["message"], r.text
        # a prompt that fills what the budget leaves: named as the prompt's fault
        r = post("/v1/completions", {"prompt": prompt(ceiling), "max_tokens": 1})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt" and "memory budget" in r.text, r.text
        # exactly at the ceiling: the pool grows to it and the request is answered
        r = post("/v1/completions", {
            "prompt": prompt(ceiling - 8, 1), "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        _, used, sched = state(s, "smol")
        assert sched["blocks_total"] * gen["kv_block_size"] == ceiling, sched
        assert used <= budget, (used, budget)
        # without max_tokens the answer is bounded by what the budget leaves, not refused
        r = post("/v1/completions", {"prompt": prompt(ceiling - 5, 2), "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        s.stop()


def test_models_that_stay_loaded_lower_the_ceiling_until_they_unload(tmp_path):
    def two_models(root):
        for name, checkpoint, tokens in [("smol", SMOL, 4096), ("tiny", "llama-gqa", 2048)]:
            (root / name).mkdir(parents=True)
            (root / name / "model.toml").write_text(
                f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / checkpoint}"\n'
                f"kv_cache_tokens = {tokens}\nmax_step_tokens = 2048\n")
        return root

    # a budget far above both: they load one after the other, as under the real one (loads
    # at the same time would share their memory measurements)
    probe = Server(two_models(tmp_path / "a"), "--model-memory-budget", str(64 << 30))
    try:
        _, smol, _ = state(probe, "smol")
        _, tiny, _ = state(probe, "tiny")
    finally:
        probe.stop()
    # without lazy model control nothing is evicted: tiny's weights stay counted until it is
    # unloaded through the management API
    budget = smol + tiny + 2 * SMALL_CHUNK + SMALL_CHUNK // 2
    s = Server(two_models(tmp_path / "b"), "--model-control", "explicit",
               "--model-memory-budget", str(budget))
    try:
        def budgeted():
            with urllib.request.urlopen(f"{s.url}/v1/models/smol") as r:
                return json.load(r)["versions"][0]["generation"]["kv_cache_tokens_budgeted"]

        def ask(n):
            return httpx.post(s.url + "/v1/completions", timeout=300, json={
                "model": "smol", "prompt": [100 + (7 * k) % 40000 for k in range(n - 4)],
                "max_tokens": 4, "ignore_eos": True})

        before = budgeted()
        assert before < 4096, (before, smol, tiny, budget)
        r = ask(before + 16)
        assert r.status_code == 400, r.text
        assert "models that stay loaded beside it" in r.json()["error"]["message"], r.text
        r = httpx.post(f"{s.url}/v1/models/tiny/unload", timeout=60)
        assert r.status_code < 300, r.text
        after = budgeted()
        assert after > before + 16, (before, after)
        r = ask(before + 16)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        s.stop()
