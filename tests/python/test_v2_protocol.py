"""The v2 protocol by hand: malformed requests, what perf_analyzer reads (it cannot be
installed here), the raw single-input mode, compression, and v2 + /v1 sharing one batch."""

import concurrent.futures
import gzip
import json
import shutil
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Server, draw_shape, pixels_chw, png_bytes


def call(server, method, path, body=None, headers=None):
    """(status, headers, body bytes) of one request; no Content-Type unless given (like tritonclient)."""
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer(server, model, request, binary=b"", headers=None):
    header = json.dumps(request).encode()
    h = dict(headers or {})
    if binary:
        h["Inference-Header-Content-Length"] = str(len(header))
    return call(server, "POST", f"/v2/models/{model}/infer", header + binary, h)


def f32(values):
    return np.asarray(values, dtype=np.float32).tobytes()


def assert_error(result, status=400, needle=""):
    code, _, body = result
    assert code == status, body
    doc = json.loads(body)
    assert isinstance(doc["error"], str) and needle in doc["error"], doc


def test_malformed_requests_get_400_with_an_error(server):
    x = {"name": "x", "shape": [2, 1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
    # header length past the body
    header = json.dumps({"inputs": [x]}).encode()
    assert_error(call(server, "POST", "/v2/models/regressor/infer", header + f32([1, 2]),
                      {"Inference-Header-Content-Length": str(len(header) + 100)}), needle="larger than the body")
    assert_error(call(server, "POST", "/v2/models/regressor/infer", header,
                      {"Inference-Header-Content-Length": "banana"}))
    # binary_data_size disagreeing with shape x datatype size, or with the bytes present
    assert_error(infer(server, "regressor", {"inputs": [dict(x, shape=[3, 1])]}, f32([1, 2])), needle="needs 12 bytes")
    assert_error(infer(server, "regressor", {"inputs": [x]}, f32([1])), needle="exceeds")
    assert_error(infer(server, "regressor", {"inputs": [x]}, f32([1, 2, 3])), needle="not claimed")
    # wrong datatype, unsupported datatype, wrong shape, unknown and missing inputs
    assert_error(infer(server, "regressor", {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1]}]}), needle="FP64")
    assert_error(infer(server, "regressor", {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "UINT32", "data": [1]}]}), needle="not supported")
    assert_error(infer(server, "regressor", {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}), needle="shape")
    assert_error(infer(server, "regressor", {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [1]}]}), needle="elements")
    assert_error(infer(server, "regressor", {"inputs": [{"name": "z", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}), needle="unknown input")
    assert_error(infer(server, "regressor", {"inputs": []}), needle="missing input")
    assert_error(infer(server, "regressor", {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
                                             "outputs": [{"name": "nope"}]}), needle="unknown output")
    assert_error(call(server, "POST", "/v2/models/regressor/infer", b"{not json"), needle="JSON")
    # BYTES with a length prefix past the end
    t = {"name": "text", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
    assert_error(infer(server, "text-classifier", {"inputs": [t]}, struct.pack("<I", 99) + b"ab"), needle="claims 99 bytes")
    # a batch larger than max_batch_size
    big = {"name": "x", "shape": [65, 1], "datatype": "FP32", "data": [0.5] * 65}
    assert_error(infer(server, "regressor", {"inputs": [big]}), needle="max_batch_size")
    # unknown model and version
    assert_error(infer(server, "nope", {"inputs": []}), status=404)
    assert_error(call(server, "GET", "/v2/models/regressor/versions/9"), status=404)
    # still serving
    code, _, body = infer(server, "regressor", {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}]})
    assert code == 200, body


def test_json_data_flat_or_nested_and_outputs_without_parameters(server):
    flat = infer(server, "regressor", {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [0, 1]}]})
    nested = infer(server, "regressor", {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [[0], [1]]}]})
    a, b = json.loads(flat[2]), json.loads(nested[2])
    assert a["outputs"][0]["data"] == b["outputs"][0]["data"]
    out = a["outputs"][0]
    assert out["shape"] == [2, 1] and out["datatype"] == "FP32"
    assert "parameters" not in out  # perf_analyzer's parser rejects an empty parameters object
    assert a["model_name"] == "regressor" and a["model_version"] == "1" and a["id"]
    mine = json.loads(infer(server, "regressor", {"id": "req-7", "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0]}]})[2])
    assert mine["id"] == "req-7"


def test_binary_outputs_on_request(server):
    req = {"inputs": [{"name": "x", "shape": [2, 1], "datatype": "FP32", "data": [0, 1]}],
           "parameters": {"binary_data_output": True}}
    code, headers, body = infer(server, "regressor", req)
    assert code == 200
    n = int(headers["inference-header-content-length"])
    assert headers["content-type"] == "application/octet-stream"
    head = json.loads(body[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    values = np.frombuffer(body[n:], dtype="<f4")
    json_values = json.loads(infer(server, "regressor", dict(req, parameters={}))[2])["outputs"][0]["data"]
    np.testing.assert_allclose(values, json_values)


def test_what_perf_analyzer_reads(server):
    # GET /v2 must carry an extensions array; statistics is listed only because it is complete
    meta = json.loads(call(server, "GET", "/v2")[2])
    assert isinstance(meta["extensions"], list) and "statistics" in meta["extensions"]
    for model in ["regressor", "image-cnn", "text-classifier"]:
        m = json.loads(call(server, "GET", f"/v2/models/{model}")[2])
        cfg = json.loads(call(server, "GET", f"/v2/models/{model}/config")[2])
        assert all(t["shape"][0] == -1 for t in m["inputs"] + m["outputs"]), m
        assert cfg["max_batch_size"] > 0 and "dynamic_batching" in cfg
        assert [i["name"] for i in cfg["input"]] == [i["name"] for i in m["inputs"]]
        assert [o["name"] for o in cfg["output"]] == [o["name"] for o in m["outputs"]]
        # config dims exclude the batch dimension that metadata shapes carry
        assert [i["dims"] for i in cfg["input"]] == [i["shape"][1:] for i in m["inputs"]]
        stats = json.loads(call(server, "GET", f"/v2/models/{model}/stats")[2])["model_stats"]
        assert stats, model
        for s in stats:
            assert isinstance(s["version"], str)
            assert isinstance(s["inference_count"], int) and isinstance(s["execution_count"], int)
            for k in ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output"]:
                assert isinstance(s["inference_stats"][k]["count"], int), (model, k)
                assert isinstance(s["inference_stats"][k]["ns"], int), (model, k)


def test_timeouts_that_are_not_positive_are_400(server):
    x = {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}
    for timeout in [0, -1, 1.5, "soon"]:
        body = json.dumps({"inputs": [x], "parameters": {"timeout": timeout}}).encode()
        assert_error(call(server, "POST", "/v2/models/regressor/infer", body),
                     needle="parameters.timeout must be a positive whole number")
    body = json.dumps({"inputs": [x]}).encode()
    for header in ["0", "-3", "soon"]:
        assert_error(call(server, "POST", "/v2/models/regressor/infer", body,
                          {"x-request-timeout-ms": header}), needle="x-request-timeout-ms")
    # a positive deadline is taken as before
    code, _, out = call(server, "POST", "/v2/models/regressor/infer",
                        json.dumps({"inputs": [x], "parameters": {"timeout": 5_000_000}}).encode(),
                        {"x-request-timeout-ms": "5000"})
    assert code == 200, out


def test_raw_single_input_mode(server):
    img = draw_shape("circle", 3)
    code, _, body = call(server, "POST", "/v2/models/image-cnn/infer", png_bytes(img),
                         {"Inference-Header-Content-Length": "0"})
    assert code == 200, body
    doc = json.loads(body)
    labels = next(o for o in doc["outputs"] if o["name"] == "labels")
    assert labels["data"] == ["circle"]
    code, _, body = call(server, "POST", "/v2/models/regressor/infer", f32([0.0, 0.5, 1.0]),
                         {"Inference-Header-Content-Length": "0"})
    assert code == 200, body
    assert json.loads(body)["outputs"][0]["shape"] == [3, 1]
    assert_error(call(server, "POST", "/v2/models/regressor/infer", b"\x00\x01\x02",
                      {"Inference-Header-Content-Length": "0"}), needle="whole number")


def test_gzip_and_deflate_bodies(server):
    body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["我爱你"]}]}).encode()
    for name, packed in [("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))]:
        code, headers, out = call(server, "POST", "/v2/models/text-classifier/infer", packed,
                                  {"Content-Encoding": name, "Accept-Encoding": name})
        assert code == 200, out
        assert headers.get("content-encoding") == name
        raw = gzip.decompress(out) if name == "gzip" else zlib.decompress(out)
        labels = next(o for o in json.loads(raw)["outputs"] if o["name"] == "labels")
        assert labels["data"] == ["positive"]


def test_v2_and_v1_requests_share_a_batch_and_get_their_own_rows(temp_repo):
    model = temp_repo / "image-cnn"
    shutil.copytree(ROOT / "models" / "image-cnn", model)
    toml = (model / "model.toml").read_text()
    toml = toml.replace("instances = 2", "instances = 1").replace("max_queue_delay_ms = 0.0", "max_queue_delay_ms = 300.0")
    (model / "model.toml").write_text(toml)
    server = Server(temp_repo)
    try:
        images = [draw_shape(k, 100 + i) for i, k in enumerate(["circle", "square", "triangle", "circle", "square", "triangle", "circle", "square"])]
        batch = np.stack([pixels_chw(i) for i in images[:4]]).astype(np.float32)
        v2_req = {"inputs": [{"name": "image", "shape": [4, 3, 64, 64], "datatype": "FP32",
                              "parameters": {"binary_data_size": batch.nbytes}}],
                  "outputs": [{"name": "scores"}]}

        def v1_one(img):
            return call(server, "POST", "/v1/models/image-cnn/predict", png_bytes(img), {"Content-Type": "image/png"})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            v2_future = pool.submit(infer, server, "image-cnn", v2_req, batch.tobytes())
            v1_futures = [pool.submit(v1_one, img) for img in images[4:]]
            v2_res = v2_future.result()
            v1_res = [f.result() for f in v1_futures]
        assert v2_res[0] == 200, v2_res[2]
        v2_batch = int(v2_res[1]["x-batch-size"])
        v1_batches = [int(r[1]["x-batch-size"]) for r in v1_res]
        assert v2_batch > 4, f"the v2 request ran alone (batch {v2_batch})"
        assert v2_batch in v1_batches, (v2_batch, v1_batches)
        # every request got exactly its own rows
        scores = np.array(json.loads(v2_res[2])["outputs"][0]["data"]).reshape(4, 3)
        for i, img in enumerate(images[:4]):
            alone = json.loads(v1_one(img)[2])["predictions"][0]["scores"]
            np.testing.assert_allclose(scores[i], [alone[k] for k in ["circle", "square", "triangle"]], atol=1e-5)
        for img, r in zip(images[4:], v1_res):
            together = json.loads(r[2])["predictions"][0]["scores"]
            alone = json.loads(v1_one(img)[2])["predictions"][0]["scores"]
            np.testing.assert_allclose(list(together.values()), list(alone.values()), atol=1e-5)
    finally:
        server.stop()
