"""Triton's own Python client (tritonclient[http], unmodified) against aiaas.

Values are checked against aiaas's /v1 answers for the same inputs.
"""

import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from conftest import Server, draw_shape, pixels_chw, png_bytes


def v1(server, model, body):
    req = urllib.request.Request(f"{server.url}/v1/models/{model}/predict",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["predictions"]


def v1_png(server, png):
    req = urllib.request.Request(f"{server.url}/v1/models/image-cnn/predict", data=png,
                                 headers={"content-type": "image/png"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["predictions"][0]


@pytest.fixture(scope="module")
def client(server):
    c = http.InferenceServerClient(server.addr)
    yield c
    c.close()


def test_server_and_model_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "aiaas"
    assert {"binary_tensor_data", "statistics", "model_repository", "model_configuration"} <= set(meta["extensions"])
    for model in ["regressor", "text-classifier", "image-cnn"]:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    m = client.get_model_metadata("image-cnn")
    assert m["platform"] == "pytorch_libtorch"
    assert m["versions"] == ["1"]
    assert m["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert [o["name"] for o in m["outputs"]] == ["scores", "labels"]
    assert client.get_model_metadata("text-classifier")["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1, 1]}
    assert not client.is_model_ready("no-such-model")
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


@pytest.mark.parametrize("binary", [True, False])
def test_regressor(server, client, binary):
    xs = np.array([[0.0], [0.5], [1.0]], dtype=np.float32)
    inp = http.InferInput("x", list(xs.shape), "FP32")
    inp.set_data_from_numpy(xs, binary_data=binary)
    out = http.InferRequestedOutput("y", binary_data=binary)
    r = client.infer("regressor", [inp], outputs=[out])
    y = r.as_numpy("y").ravel()
    expected = v1(server, "regressor", {"instances": [[0.0], [0.5], [1.0]]})
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert 1.8 <= y[1] <= 2.2
    assert r.get_response()["model_name"] == "regressor"


@pytest.mark.parametrize("binary", [True, False])
def test_text_classifier(server, client, binary):
    texts = ["我爱你", "I love this wonderful day", "This is terrible and I hate it", "太糟糕了，我很失望"]
    arr = np.array([[t.encode()] for t in texts], dtype=object)
    inp = http.InferInput("text", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr, binary_data=binary)
    outs = [http.InferRequestedOutput("scores", binary_data=binary),
            http.InferRequestedOutput("labels", binary_data=binary)]
    r = client.infer("text-classifier", [inp], outputs=outs)
    labels = [l[0].decode() if isinstance(l[0], bytes) else l[0] for l in r.as_numpy("labels")]
    assert labels == ["positive", "positive", "negative", "negative"]
    expected = v1(server, "text-classifier", {"instances": texts})
    np.testing.assert_allclose(r.as_numpy("scores"),
                               [[p["scores"]["negative"], p["scores"]["positive"]] for p in expected], atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_image_cnn_fp32_and_encoded(server, client, binary):
    images = [draw_shape(k, seed) for seed, k in enumerate(["circle", "square", "triangle", "circle"])]
    batch = np.stack([pixels_chw(i) for i in images]).astype(np.float32)
    inp = http.InferInput("image", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch, binary_data=binary)
    r = client.infer("image-cnn", [inp], outputs=[http.InferRequestedOutput("scores", binary_data=binary)])
    scores = r.as_numpy("scores")
    assert scores.shape == (4, 3)
    assert r.as_numpy("labels") is None  # only what was asked for
    expected = [v1_png(server, png_bytes(i)) for i in images]
    np.testing.assert_allclose(scores, [[e["scores"][k] for k in ["circle", "square", "triangle"]] for e in expected], atol=1e-5)
    # the same images as BYTES (encoded PNGs), decoded by the server as /v1 does
    encoded = np.array([[png_bytes(i)] for i in images], dtype=object)
    inp = http.InferInput("image", list(encoded.shape), "BYTES")
    inp.set_data_from_numpy(encoded, binary_data=True)
    r = client.infer("image-cnn", [inp])
    np.testing.assert_allclose(r.as_numpy("scores"), scores, atol=1e-5)
    labels = [l[0].decode() for l in r.as_numpy("labels")]
    assert labels == [e["label"] for e in expected]


def test_compressed_requests_and_responses(client):
    xs = np.linspace(0, 1, 64, dtype=np.float32).reshape(64, 1)
    inp = http.InferInput("x", [64, 1], "FP32")
    inp.set_data_from_numpy(xs)
    plain = client.infer("regressor", [inp]).as_numpy("y")
    for algo in ["gzip", "deflate"]:
        r = client.infer("regressor", [inp], request_compression_algorithm=algo, response_compression_algorithm=algo)
        np.testing.assert_allclose(r.as_numpy("y"), plain)


def test_model_config_and_statistics(client):
    cfg = client.get_model_config("image-cnn")
    assert cfg["max_batch_size"] == 32
    assert cfg["platform"] == "pytorch_libtorch"
    assert [i["name"] for i in cfg["input"]] == ["image"]
    assert cfg["input"][0]["dims"] == [3, 64, 64]
    assert [o["name"] for o in cfg["output"]] == ["scores", "labels"]
    assert "dynamic_batching" in cfg
    before = client.get_inference_statistics("regressor")["model_stats"][0]
    inp = http.InferInput("x", [2, 1], "FP32")
    inp.set_data_from_numpy(np.array([[0.1], [0.2]], dtype=np.float32))
    client.infer("regressor", [inp])
    after = client.get_inference_statistics("regressor")["model_stats"][0]
    assert after["version"] == "1"
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] == before["execution_count"] + 1
    for k in ["queue", "compute_input", "compute_infer", "compute_output"]:
        assert after["inference_stats"][k]["count"] > before["inference_stats"][k]["count"]
        assert after["inference_stats"][k]["ns"] > before["inference_stats"][k]["ns"]
    assert after["last_inference"] > 0
    everything = client.get_inference_statistics()
    assert {s["name"] for s in everything["model_stats"]} >= {"regressor", "image-cnn", "text-classifier"}


def test_repository_index_load_and_unload(client):
    index = client.get_model_repository_index()
    by_name = {m["name"]: m for m in index}
    assert by_name["regressor"]["state"] == "READY"
    assert by_name["regressor"]["version"] == "1"
    client.unload_model("text-classifier")
    assert not client.is_model_ready("text-classifier")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states["text-classifier"] == "UNAVAILABLE"
    client.load_model("text-classifier")
    assert client.is_model_ready("text-classifier")
    with pytest.raises(InferenceServerException):
        client.load_model("no-such-model")


HF_FIXTURES = Path(os.environ.get("AIAAS_HF_FIXTURES", Path(__file__).resolve().parents[2] / ".fixtures" / "hf"))


@pytest.fixture(scope="module")
def hf_server():
    """The Hugging Face fixtures (make test builds them: .ci/hf-fixtures.sh)."""
    if not (HF_FIXTURES / ".stamp").exists():
        pytest.fail(f"no Hugging Face fixtures in {HF_FIXTURES}: run .ci/hf-fixtures.sh")
    s = Server(HF_FIXTURES, "--load-model", "minilm,cross-encoder")
    yield s
    s.stop()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_sends_text_to_embedding_and_reranker_models(hf_server, binary):
    c = http.InferenceServerClient(hf_server.addr)
    try:
        meta = c.get_model_metadata("minilm")
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
        ref = json.loads((HF_FIXTURES / "minilm" / "reference.json").read_text())["items"]
        texts = [i["text"] for i in ref]
        arr = np.array([[t.encode()] for t in texts], dtype=object)
        inp = http.InferInput("text", list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr, binary_data=binary)
        out = c.infer("minilm", [inp], outputs=[http.InferRequestedOutput("embedding", binary_data=binary)])
        emb = out.as_numpy("embedding")
        assert emb.shape == (len(texts), 384)
        expected = np.array([i["embedding"] for i in ref], dtype=np.float32)
        assert np.abs(emb - expected).max() < 1e-5
        # the reranker takes query and document BYTES inputs, row by row
        pairs = json.loads((HF_FIXTURES / "cross-encoder" / "reference.json").read_text())["items"]
        inputs = []
        for name in ["query", "document"]:
            a = np.array([[p[name].encode()] for p in pairs], dtype=object)
            i = http.InferInput(name, list(a.shape), "BYTES")
            i.set_data_from_numpy(a, binary_data=binary)
            inputs.append(i)
        out = c.infer("cross-encoder", inputs, outputs=[http.InferRequestedOutput("score", binary_data=binary)])
        score = out.as_numpy("score").reshape(-1)
        assert np.abs(score - np.array([p["score"] for p in pairs])).max() < 1e-5
    finally:
        c.close()
