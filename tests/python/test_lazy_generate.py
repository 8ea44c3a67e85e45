"""Generative models under `--model-control lazy` and a model memory budget: the first chat or
completions request loads the model (streamed or not), idle decoders are evicted least recently
used when another model needs their room, a decoder with a running stream is never evicted (the
request that would need its room waits for it within its deadline, else is refused), and the
wait for a load counts against the request's deadline.

The tiny random checkpoints of `make llm-fixtures` measure about 35 MiB each with a 2,048-token
KV cache (weights, cache and what libtorch keeps for them); the budgets below hold two of them,
or one."""

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
TINY = ["llama-gqa", "qwen2", "mistral"]
SMOL = "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not (FIXTURES / SMOL / "reference.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


def lazy_server(tmp_path, budget, names=TINY, extra=""):
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.toml").write_text(
            f'kind = "text-generation"\n[generation]\ncheckpoint = "{FIXTURES / name}"\n'
            f"kv_cache_tokens = 2048\n{extra}")
    args = ["--model-control", "lazy"]
    if budget:
        args += ["--model-memory-budget", budget]
    return Server(tmp_path, *args)


def models(s):
    with urllib.request.urlopen(s.url + "/v1/models") as r:
        return {m["name"]: m for m in json.load(r)["models"]}


def chat(s, model, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)


def test_the_first_request_loads_a_generative_model_streamed_or_not(tmp_path):
    s = lazy_server(tmp_path, budget=None)
    try:
        assert {m["state"] for m in models(s).values()} == {"unloaded"}
        first = chat(s, "llama-gqa")
        assert first.status_code == 200, first.text
        assert first.headers["x-model-loaded"] == "cold"
        again = chat(s, "llama-gqa")
        assert again.headers["x-model-loaded"] == "warm"
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        # a streamed completion is the first request of another model
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        chunks = client.completions.create(model="qwen2", prompt="Once upon", max_tokens=6,
                                           temperature=0, stream=True)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        whole = client.completions.create(model="qwen2", prompt="Once upon", max_tokens=6,
                                          temperature=0)
        assert streamed == whole.choices[0].text and streamed
        state = models(s)
        assert state["llama-gqa"]["state"] == state["qwen2"]["state"] == "ready"
        assert state["mistral"]["state"] == "unloaded"
        metrics = urllib.request.urlopen(s.url + "/metrics").read().decode()
        assert 'aiaas_model_loads_total{model="qwen2",reason="on_demand"}' in metrics
    finally:
        s.stop()


def test_an_idle_decoder_is_evicted_least_recently_used_and_comes_back(tmp_path):
    s = lazy_server(tmp_path, budget="100MiB")
    try:
        answers = {}
        for name in ["llama-gqa", "qwen2"]:
            r = chat(s, name)
            assert r.status_code == 200, r.text
            answers[name] = r.json()["choices"][0]["message"]["content"]
        # llama-gqa used last: qwen2 is the least recently used one
        assert chat(s, "llama-gqa").headers["x-model-loaded"] == "warm"
        r = chat(s, "mistral")
        assert r.status_code == 200 and r.headers["x-model-loaded"] == "cold", r.text
        state = models(s)
        assert state["qwen2"]["state"] == "unloaded"
        assert "evicted" in state["qwen2"]["reason"] and "mistral" in state["qwen2"]["reason"]
        assert state["llama-gqa"]["state"] == "ready", state["llama-gqa"]
        # loaded again on demand, it answers as before
        r = chat(s, "qwen2")
        assert r.headers["x-model-loaded"] == "cold"
        assert r.json()["choices"][0]["message"]["content"] == answers["qwen2"]
        resident = sum(v.get("memory_bytes", 0) for m in models(s).values()
                       for v in m["versions"])
        assert 0 < resident <= 100 << 20
    finally:
        s.stop()


def test_a_decoder_with_a_running_stream_is_never_evicted(tmp_path):
    # room for one model only
    s = lazy_server(tmp_path, budget="60MiB")
    try:
        # a stream read slowly (a small receive buffer, nothing read for a while): its sequence
        # is still running, or paused on its unread tokens, when the other model is asked for
        host, port = s.addr.rsplit(":", 1)
        body = json.dumps({"model": "llama-gqa", "prompt": [5, 6, 7], "max_tokens": 240,
                           "ignore_eos": True, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect((host, int(port)))
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                      f"{body}").encode())
        got = sock.recv(512)
        assert got.startswith(b"HTTP/1.1 200") and b"x-model-loaded: cold" in got.lower(), got
        # another model needs the streaming one's room: it waits for it within its
        # deadline, then is refused, not evicting the streaming one
        other = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           headers={"x-request-timeout-ms": "1500"},
                           json={"model": "qwen2", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "hi"}]})
        assert other.status_code == 503, other.text
        err = other.json()["error"]
        assert "budget" in err["message"] and "'llama-gqa' (busy" in err["message"], err
        assert models(s)["llama-gqa"]["state"] == "ready"
        # one with time to spare waits while the stream goes on
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(chat, s, "qwen2", max_tokens=2)
            time.sleep(0.5)
            assert models(s)["llama-gqa"]["state"] == "ready"
            assert not waiting.done()
            # the stream goes on to its end, every token there
            sock.settimeout(60)
            while b"data: [DONE]" not in got:
                more = sock.recv(65536)
                assert more, got[-300:]
                got += more
            sock.close()
            assert b'"completion_tokens":240' in got, got[-300:]
            # then the waiting request gets the room
            other = waiting.result()
        assert other.status_code == 200, other.text
        assert other.headers["x-model-loaded"] == "cold"
        assert models(s)["llama-gqa"]["state"] == "unloaded"
    finally:
        s.stop()


def test_the_wait_for_a_load_counts_against_the_deadline(tmp_path):
    s = lazy_server(tmp_path, budget=None, names=[SMOL])
    try:
        # far too short for the load: the request gives up waiting, within its deadline
        r = httpx.post(
            s.url + "/v1/chat/completions", headers={"x-request-timeout-ms": "1"},
            json={"model": SMOL, "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
        assert r.status_code in (503, 504), r.text
        assert "deadline" in r.text or "loading" in r.text, r.text
        # wait for that load to end, and give the model back: the next request loads it again
        for _ in range(600):
            if models(s)[SMOL]["state"] == "ready":
                break
            time.sleep(0.1)
        assert models(s)[SMOL]["state"] == "ready"
        unload = httpx.post(s.url + f"/v1/models/{SMOL}/unload", timeout=60)
        assert unload.status_code == 200, unload.text
        # a deadline longer than the load but far shorter than the answer: the answer ends at
        # the deadline counted from the request's arrival, the load's time included
        timeout_ms = 20000
        started = time.monotonic()
        with httpx.stream("POST", s.url + "/v1/completions",
                          headers={"x-request-timeout-ms": str(timeout_ms)},
                          json={"model": SMOL, "prompt": "Once upon a time", "max_tokens": 2000,
                                "ignore_eos": True, "temperature": 0, "stream": True},
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["x-model-loaded"] == "cold"
            lines = list(r.iter_lines())
        elapsed_ms = (time.monotonic() - started) * 1e3
        v = models(s)[SMOL]["versions"][0]
        load_ms = v["load_ms"] + v["warmup_ms"]
        text = "\n".join(lines)
        assert "deadline" in text, text[-500:]
        print(f"deadline {timeout_ms} ms, load {load_ms} ms, answer ended after {elapsed_ms:.0f} ms")
        # counted from after the load it would end near timeout_ms + load_ms
        assert elapsed_ms < timeout_ms + load_ms / 2, (elapsed_ms, load_ms)
    finally:
        s.stop()
