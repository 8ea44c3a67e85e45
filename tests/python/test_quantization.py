"""Quantized SmolLM2 served over HTTP: model.toml's `quantization` loads the model with int8
or int4 weights, the model's metadata and its ready log line say so, and the OpenAI client's
chat answers the fixture question as fp32 does in substance (tests/quantization.rs measures
the accuracy against fp32)."""

import json
import os
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import ROOT, Server

FIXTURES = Path(os.environ.get("AIAAS_LLM_FIXTURES", ROOT / ".fixtures" / "llm"))
SMOL = FIXTURES / "smollm2-135m-instruct"

pytestmark = pytest.mark.skipif(
    not (SMOL / "reference.json").exists(),
    reason="the generation fixtures are missing: run `make llm-fixtures`",
)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    repo = tmp_path_factory.mktemp("quant-repo")
    for name, extra in [("smol-int8", 'quantization = "int8"\n'),
                        ("smol-int4", 'quantization = "int4"\n'),
                        ("smol-int4-g64", 'quantization = "int4"\nquantization_group_size = 64\n')]:
        (repo / name).mkdir()
        (repo / name / "model.toml").write_text(
            'kind = "text-generation"\n[generation]\n'
            f'checkpoint = "{SMOL}"\nkv_cache_tokens = 2048\n{extra}')
    s = Server(repo)
    yield s
    s.stop()


def metadata(server, model):
    with urllib.request.urlopen(f"{server.url}/v1/models/{model}") as r:
        return json.load(r)["versions"][0]


@pytest.mark.parametrize("model,quantization,group", [
    ("smol-int8", "int8", None), ("smol-int4", "int4", 32), ("smol-int4-g64", "int4", 64)])
def test_metadata_and_log_name_the_quantization(quantized, model, quantization, group):
    g = metadata(quantized, model)["generation"]
    assert g["quantization"] == quantization
    assert g["quantization_group_size"] == group
    ready = [line for line in quantized.log if f"model ready: {model} " in line]
    assert ready and f"weights {quantization}" in ready[0], ready


@pytest.mark.parametrize("model", ["smol-int8", "smol-int4"])
def test_a_quantized_model_answers_the_fixture_question(quantized, model):
    ref = next(p for p in json.loads((SMOL / "reference.json").read_text())["prompts"]
               if p["name"] == "chat")
    client = openai.OpenAI(base_url=quantized.url + "/v1", api_key="unused", max_retries=0,
                           timeout=120)
    r = client.chat.completions.create(
        model=model, messages=ref["messages"], temperature=0, max_tokens=30)
    # fp32 answers "The capital of France is Paris."
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens == len(ref["input_ids"])
