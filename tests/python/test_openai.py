"""The official `openai` Python package against aiaas's /v1/embeddings (and its model list):
the client a LangChain or LlamaIndex user already has, pointed at the server with `base_url` and
`api_key`. Vectors are checked against sentence-transformers' reference answers for the real
all-MiniLM-L6-v2 weights (.fixtures/hf, built by .ci/hf-fixtures.sh) and against /v1 predict."""

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from conftest import Server

HF_FIXTURES = Path(os.environ.get("AIAAS_HF_FIXTURES", Path(__file__).resolve().parents[2] / ".fixtures" / "hf"))
INFER_KEY = "infer:openai-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server():
    """minilm and a classifier, behind an API key of scope 'infer'."""
    if not (HF_FIXTURES / ".stamp").exists():
        pytest.fail(f"no Hugging Face fixtures in {HF_FIXTURES}: run .ci/hf-fixtures.sh")
    os.environ["AIAAS_API_KEYS"] = INFER_KEY
    try:
        s = Server(HF_FIXTURES, "--load-model", "minilm,bert-classifier")
    finally:
        del os.environ["AIAAS_API_KEYS"]
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(keyed_server):
    return openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=INFER_KEY.split(":", 1)[1], max_retries=0)


@pytest.fixture(scope="module")
def reference():
    return json.loads((HF_FIXTURES / "minilm" / "reference.json").read_text())["items"]


def predict(server, texts):
    req = urllib.request.Request(
        server.url + "/v1/models/minilm/predict", data=json.dumps({"instances": texts}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Bearer " + INFER_KEY.split(":", 1)[1]})
    with urllib.request.urlopen(req, timeout=30) as r:
        return [np.array(p["embedding"]) for p in json.load(r)["predictions"]]


def test_many_texts_as_floats_equal_sentence_transformers_and_v1_predict(client, keyed_server, reference):
    texts = [i["text"] for i in reference]
    res = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert res.object == "list" and res.model == "minilm"
    assert [d.index for d in res.data] == list(range(len(texts)))
    assert res.usage.prompt_tokens == res.usage.total_tokens == sum(i["num_tokens"] for i in reference)
    got = np.array([d.embedding for d in res.data])
    np.testing.assert_allclose(got, np.array([i["embedding"] for i in reference]), atol=1e-5)
    np.testing.assert_allclose(got, np.array(predict(keyed_server, texts)), atol=1e-6)


def test_base64_one_text(client, reference):
    # the client's default asks for base64 and decodes it to floats itself
    res = client.embeddings.create(model="minilm", input=reference[0]["text"])
    assert len(res.data) == 1 and len(res.data[0].embedding) == 384
    np.testing.assert_allclose(res.data[0].embedding, reference[0]["embedding"], atol=1e-5)
    # and asked for explicitly, it is the base64 of little-endian FP32
    raw = client.embeddings.with_raw_response.create(
        model="minilm", input=reference[0]["text"], encoding_format="base64")
    b64 = json.loads(raw.text)["data"][0]["embedding"]
    import base64
    v = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_allclose(v, reference[0]["embedding"], atol=1e-5)


def test_token_id_inputs(client, reference):
    one = client.embeddings.create(model="minilm", input=reference[1]["input_ids"], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference[1]["embedding"], atol=1e-5)
    many = client.embeddings.create(
        model="minilm", input=[i["input_ids"] for i in reference[:3]], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in many.data], [i["embedding"] for i in reference[:3]], atol=1e-5)


def test_dimensions_truncate_and_renormalise(client, reference):
    res = client.embeddings.create(model="minilm", input=reference[2]["text"], dimensions=128,
                                   encoding_format="float")
    v = np.array(res.data[0].embedding)
    assert v.shape == (128,)
    head = np.array(reference[2]["embedding"][:128])
    np.testing.assert_allclose(v, head / np.linalg.norm(head), atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.embeddings.create(model="minilm", input="x", dimensions=1000)
    assert e.value.body["param"] == "dimensions" and "384" in e.value.body["message"]


def test_unknown_model_and_wrong_kind(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-model", input="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="bert-classifier", input="x")
    assert "text-embedding" in e.value.body["message"]


def test_a_bad_key_is_an_authentication_error(keyed_server):
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.embeddings.create(model="minilm", input="x")
    assert e.value.body["code"] == "invalid_api_key"
    assert e.value.body["type"] == "authentication_error"


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "minilm" in ids and "bert-classifier" in ids
