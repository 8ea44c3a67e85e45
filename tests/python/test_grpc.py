"""KServe v2 over gRPC with Triton's own client (tritonclient[grpc], unmodified), grpcio's
health and reflection clients, and KServe's gRPC client. Values are checked against the same
server's HTTP answers for the same inputs.

Run in a pytest process of its own (.ci/test-all.sh does): tritonclient.grpc's generated code
and kserve's define the same protobuf package, which protobuf loads only once per process."""

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import ROOT, Server, draw_shape, free_port, pixels_chw, png_bytes

DEMO = "regressor,text-classifier,image-cnn"


@pytest.fixture(scope="module")
def server():
    s = Server(ROOT / "models", "--model-control", "explicit", "--load-model", DEMO, grpc=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc_addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_addr)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def http_infer(server, model, inputs, outputs=None):
    c = th.InferenceServerClient(server.addr)
    try:
        return c.infer(model, inputs, outputs=outputs)
    finally:
        c.close()


def fp32_input(module, name, array):
    i = module.InferInput(name, list(array.shape), "FP32")
    i.set_data_from_numpy(array)
    return i


def bytes_input(module, name, items):
    arr = np.array([[x] for x in items], dtype=object)
    i = module.InferInput(name, list(arr.shape), "BYTES")
    i.set_data_from_numpy(arr)
    return i


def test_health_metadata_and_config(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "aiaas"
    assert {"binary_tensor_data", "statistics", "model_repository", "model_configuration"} <= set(meta.extensions)
    for model in DEMO.split(","):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    m = client.get_model_metadata("image-cnn")
    assert m.platform == "pytorch_libtorch"
    assert list(m.versions) == ["1"]
    assert [(i.name, i.datatype, list(i.shape)) for i in m.inputs] == [("image", "FP32", [-1, 3, 64, 64])]
    assert [o.name for o in m.outputs] == ["scores", "labels"]
    cfg = client.get_model_config("image-cnn").config
    assert cfg.max_batch_size == 32
    assert cfg.platform == "pytorch_libtorch"
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("image", [3, 64, 64])]
    assert cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].count == 2
    # the same facts over HTTP, as JSON
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert "StatusCode.NOT_FOUND" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready("regressor", "7")
    assert "NOT_FOUND" in str(e.value)


@pytest.mark.parametrize("raw", [True, False])
def test_regressor_raw_and_typed_contents(server, client, stub, raw):
    xs = np.array([[0.0], [0.5], [1.0]], dtype=np.float32)
    expected = http_infer(server, "regressor", [fp32_input(th, "x", xs)]).as_numpy("y")
    if raw:
        r = client.infer("regressor", [fp32_input(tg, "x", xs)], request_id="r-1")
        y = r.as_numpy("y")
        assert r.get_response().id == "r-1"
    else:
        # typed contents: fp32_contents, which tritonclient never sends
        req = service_pb2.ModelInferRequest(model_name="regressor", id="typed")
        i = req.inputs.add(name="x", datatype="FP32", shape=[3, 1])
        i.contents.fp32_contents.extend(xs.ravel().tolist())
        resp = stub.ModelInfer(req)
        assert resp.id == "typed" and resp.model_name == "regressor" and resp.model_version == "1"
        assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("y", "FP32", [3, 1])]
        y = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(3, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert 1.8 <= y[1, 0] <= 2.2


@pytest.mark.parametrize("raw", [True, False])
def test_text_classifier_bytes(server, client, stub, raw):
    texts = ["我爱你", "I love this wonderful day", "This is terrible and I hate it", "太糟糕了，我很失望"]
    expected = http_infer(server, "text-classifier", [bytes_input(th, "text", [t.encode() for t in texts])])
    if raw:
        r = client.infer("text-classifier", [bytes_input(tg, "text", [t.encode() for t in texts])])
        scores, labels = r.as_numpy("scores"), [l[0].decode() for l in r.as_numpy("labels")]
    else:
        req = service_pb2.ModelInferRequest(model_name="text-classifier")
        i = req.inputs.add(name="text", datatype="BYTES", shape=[4, 1])
        i.contents.bytes_contents.extend([t.encode() for t in texts])
        resp = stub.ModelInfer(req)
        names = [o.name for o in resp.outputs]
        scores = np.frombuffer(resp.raw_output_contents[names.index("scores")], dtype=np.float32).reshape(4, 2)
        raw_labels = resp.raw_output_contents[names.index("labels")]
        labels, at = [], 0
        while at < len(raw_labels):
            n = int.from_bytes(raw_labels[at:at + 4], "little")
            labels.append(raw_labels[at + 4:at + 4 + n].decode())
            at += 4 + n
    assert labels == ["positive", "positive", "negative", "negative"]
    np.testing.assert_allclose(scores, expected.as_numpy("scores"), atol=1e-6)


def test_image_cnn_tensor_and_encoded_images(server, client):
    images = [draw_shape(k, seed) for seed, k in enumerate(["circle", "square", "triangle"])]
    batch = np.stack([pixels_chw(i) for i in images]).astype(np.float32)
    r = client.infer("image-cnn", [fp32_input(tg, "image", batch)], outputs=[tg.InferRequestedOutput("scores")])
    scores = r.as_numpy("scores")
    assert scores.shape == (3, 3)
    assert r.as_numpy("labels") is None  # only what was asked for
    expected = http_infer(server, "image-cnn", [fp32_input(th, "image", batch)]).as_numpy("scores")
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    # encoded PNGs as BYTES, decoded by the server
    r = client.infer("image-cnn", [bytes_input(tg, "image", [png_bytes(i) for i in images])])
    np.testing.assert_allclose(r.as_numpy("scores"), scores, atol=1e-5)
    assert len(r.as_numpy("labels")) == 3


def test_gzip_async_and_statistics(client):
    xs = np.linspace(0, 1, 16, dtype=np.float32).reshape(16, 1)
    plain = client.infer("regressor", [fp32_input(tg, "x", xs)]).as_numpy("y")
    gz = client.infer("regressor", [fp32_input(tg, "x", xs)], compression_algorithm="gzip").as_numpy("y")
    np.testing.assert_allclose(gz, plain)
    before = client.get_inference_statistics("regressor").model_stats[0]
    done = queue.Queue()
    for k in range(4):
        client.async_infer("regressor", [fp32_input(tg, "x", xs[k:k + 1])], callback=lambda result, error: done.put((result, error)))
    got = [done.get(timeout=30) for _ in range(4)]
    assert all(e is None for _, e in got)
    assert sorted(float(r.as_numpy("y")[0, 0]) for r, _ in got) == pytest.approx(sorted(plain[:4, 0].tolist()), rel=1e-6)
    after = client.get_inference_statistics("regressor").model_stats[0]
    assert after.version == "1"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 4
    assert after.inference_count == before.inference_count + 4
    assert after.inference_stats.queue.ns > before.inference_stats.queue.ns
    everything = client.get_inference_statistics()
    assert {s.name for s in everything.model_stats} >= set(DEMO.split(","))


def test_stream_answers_every_request_and_survives_a_bad_one(client):
    xs = np.linspace(0, 1, 8, dtype=np.float32)
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for k, x in enumerate(xs):
            client.async_stream_infer("regressor", [fp32_input(tg, "x", np.array([[x]], dtype=np.float32))],
                                      request_id=f"s{k}")
        client.async_stream_infer("no-such-model", [fp32_input(tg, "x", np.array([[0.0]], dtype=np.float32))],
                                  request_id="bad")
        client.async_stream_infer("regressor", [fp32_input(tg, "x", np.array([[1.0]], dtype=np.float32))],
                                  request_id="after")
        got = [results.get(timeout=30) for _ in range(len(xs) + 2)]
    finally:
        client.stop_stream()
    answers = {r.get_response().id: r.as_numpy("y")[0, 0] for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "no-such-model" in str(errors[0])
    single = client.infer("regressor", [fp32_input(tg, "x", xs.reshape(-1, 1))]).as_numpy("y")[:, 0]
    for k in range(len(xs)):
        assert answers[f"s{k}"] == pytest.approx(single[k], rel=1e-6)
    assert "after" in answers


def test_errors_are_grpc_codes(server, stub):
    def code_of(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    req = service_pb2.ModelInferRequest(model_name="regressor")
    i = req.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    i.contents.int_contents.extend([1, 2])
    code, details = code_of(lambda: stub.ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "fp32_contents" in details
    req = service_pb2.ModelInferRequest(model_name="regressor")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    req.raw_input_contents.append(b"\0" * 7)
    code, details = code_of(lambda: stub.ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "8 bytes" in details
    req = service_pb2.ModelInferRequest(model_name="regressor")
    req.inputs.add(name="x", datatype="UINT64", shape=[1, 1]).contents.uint64_contents.append(1)
    code, details = code_of(lambda: stub.ModelInfer(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UINT64" in details
    req = service_pb2.ModelInferRequest(model_name="regressor", model_version="x")
    assert code_of(lambda: stub.ModelInfer(req))[0] == grpc.StatusCode.NOT_FOUND
    # shared memory is refused, not pretended
    code, _ = code_of(lambda: stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest()))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    # bytes that are no protobuf message at all
    channel = grpc.insecure_channel(server.grpc_addr)
    garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    code, _ = code_of(lambda: garbage(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    unknown = channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")
    assert code_of(lambda: unknown(b"", timeout=10))[0] == grpc.StatusCode.UNIMPLEMENTED
    channel.close()
    # and the server goes on
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live


def test_grpc_health_and_reflection(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool

    channel = grpc.insecure_channel(server.grpc_addr)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "inference.GRPCInferenceService"]:
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    pool = DescriptorPool(db)
    svc = pool.FindServiceByName("inference.GRPCInferenceService")
    infer = svc.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert "raw_input_contents" in infer.input_type.fields_by_name
    assert svc.methods_by_name["ModelStreamInfer"].server_streaming
    channel.close()


def test_repository_load_and_unload(client):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["regressor"].state == "READY" and index["regressor"].version == "1"
    client.unload_model("text-classifier")
    assert not client.is_model_ready("text-classifier")
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states["text-classifier"] == "UNAVAILABLE"
    client.load_model("text-classifier")
    assert client.is_model_ready("text-classifier")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("no-such-model")
    assert "NOT_FOUND" in str(e.value) or "INVALID_ARGUMENT" in str(e.value)


def test_metrics_count_grpc_calls_with_a_protocol_label(server, client):
    xs = np.array([[0.25]], dtype=np.float32)
    client.infer("regressor", [fp32_input(tg, "x", xs)])
    with pytest.raises(InferenceServerException):
        client.infer("regressor", [fp32_input(tg, "nope", xs)])
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    lines = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and not l.startswith("#")}
    assert lines['aiaas_requests_total{model="regressor",outcome="success",protocol="grpc",version="1"}'] >= 1
    assert lines['aiaas_requests_total{model="regressor",outcome="client_error",protocol="grpc",version="1"}'] >= 1
    assert lines['aiaas_grpc_requests_total{code="OK",method="ModelInfer"}'] >= 1
    assert lines['aiaas_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}'] >= 1
    assert 'aiaas_grpc_request_duration_seconds_bucket{method="ModelInfer",le="+Inf"}' in lines
    # the Grafana dashboard's gRPC panels query families this server exports
    import re
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/aiaas.json").read_text())
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for p in dashboard["panels"]
               for t in p.get("targets", []) for m in re.findall(r"aiaas_grpc_\w+", t["expr"])}
    assert queried, "no gRPC panel in the dashboard"
    exported = {re.sub(r"_(bucket|sum|count)$", "", k.split("{")[0]) for k in lines}
    assert queried <= exported, queried - exported


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def run():
    c = InferenceGRPCClient(sys.argv[1], timeout=30)
    try:
        assert await c.is_server_ready()
        i = InferInput("x", [2, 1], "FP32")
        i.set_data_from_numpy(np.array([[0.0], [1.0]], dtype=np.float32))
        r = await c.infer(InferRequest(model_name="regressor", infer_inputs=[i], request_id="k"))
        print(json.dumps({"id": r.id, "y": r.outputs[0].as_numpy().ravel().tolist()}))
    finally:
        await c.close()

asyncio.run(run())
"""


def test_kserve_grpc_client(server):
    # its own process: KServe's generated protos and tritonclient's define the same messages,
    # which protobuf refuses to load twice in one process
    out = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, server.grpc_addr],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["id"] == "k"
    expected = http_infer(server, "regressor", [fp32_input(th, "x", np.array([[0.0], [1.0]], dtype=np.float32))]).as_numpy("y")
    np.testing.assert_allclose(np.array(got["y"]).reshape(2, 1), expected, rtol=1e-6)


HF = ROOT / ".fixtures" / "hf"


def test_embedding_and_reranker_kinds(tmp_path):
    """The Hugging Face kinds over gRPC, against the references transformers computed."""
    if not (HF / ".stamp").exists():
        pytest.fail(f"no Hugging Face fixtures in {HF}: run .ci/hf-fixtures.sh")
    s = Server(HF, "--load-model", "minilm,cross-encoder", grpc=True)
    try:
        c = tg.InferenceServerClient(s.grpc_addr)
        ref = json.loads((HF / "minilm" / "reference.json").read_text())["items"]
        r = c.infer("minilm", [bytes_input(tg, "text", [i["text"].encode() for i in ref])],
                    request_id="emb", headers={"x-request-id": "trace-me-42"})
        emb = r.as_numpy("embedding")
        assert emb.shape == (len(ref), 384)
        assert np.abs(emb - np.array([i["embedding"] for i in ref], dtype=np.float32)).max() < 1e-5
        pairs = json.loads((HF / "cross-encoder" / "reference.json").read_text())["items"]
        inputs = [bytes_input(tg, name, [p[name].encode() for p in pairs]) for name in ["query", "document"]]
        out = c.infer("cross-encoder", inputs, outputs=[tg.InferRequestedOutput("score")])
        score = out.as_numpy("score").reshape(-1)
        assert np.abs(score - np.array([p["score"] for p in pairs])).max() < 1e-5
        c.close()
        # the call's request id is the client's, logged with it
        time.sleep(0.5)
        assert any("trace-me-42" in line and "ModelInfer" in line for line in s.log), "".join(s.log[-20:])
    finally:
        s.stop()


def test_keys_and_scopes(tmp_path):
    keys = {"infer": "infer-key-0123456789", "admin": "admin-key-0123456789"}
    path = tmp_path / "keys"
    path.write_text(f"infer {keys['infer']}\nadmin {keys['admin']}\n")
    s = Server(ROOT / "models", "--model-control", "explicit", "--load-model", "regressor",
               "--api-keys-file", str(path), grpc=True)
    try:
        c = tg.InferenceServerClient(s.grpc_addr)
        assert c.is_server_live()  # public, as /v2/health/live
        xs = fp32_input(tg, "x", np.array([[0.5]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("regressor", [xs])
        assert "UNAUTHENTICATED" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            c.infer("regressor", [xs], headers={"authorization": "Bearer wrong-key-0123456789"})
        assert "UNAUTHENTICATED" in str(e.value)
        y = c.infer("regressor", [xs], headers={"authorization": f"Bearer {keys['infer']}"}).as_numpy("y")
        assert y.shape == (1, 1)
        with pytest.raises(InferenceServerException) as e:
            c.unload_model("regressor", headers={"authorization": f"Bearer {keys['infer']}"})
        assert "PERMISSION_DENIED" in str(e.value)
        c.get_model_repository_index(headers={"authorization": f"Bearer {keys['admin']}"})
        c.close()
    finally:
        s.stop()


def test_hostile_clients_cost_a_bounded_amount():
    """A message over the limit, a stream that never sends, a stream whose answers nobody
    reads: each is refused or ended, and the server goes on answering."""
    s = Server(ROOT / "models", "--load-model", "regressor", "--max-body-bytes", "65536",
               "--grpc-stream-idle-timeout", "1", grpc=True)
    try:
        channel = grpc.insecure_channel(s.grpc_addr)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        # over --max-body-bytes
        req = service_pb2.ModelInferRequest(model_name="regressor")
        req.inputs.add(name="x", datatype="FP32", shape=[32768, 1])
        req.raw_input_contents.append(b"\0" * (32768 * 4))
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a stream that opens and never sends: ended by the server after the idle timeout
        never = threading.Event()

        def silent():
            never.wait(60)
            return
            yield

        started = time.monotonic()
        responses = stub.ModelStreamInfer(silent(), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            next(responses)
        never.set()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request on this stream" in e.value.details()
        assert time.monotonic() - started < 30
        # a stream that sends many requests and never reads: the server stops reading it
        def many():
            small = service_pb2.ModelInferRequest(model_name="regressor")
            small.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(0.5)
            for _ in range(5000):
                yield small
        unread = stub.ModelStreamInfer(many(), timeout=60)
        time.sleep(2)
        # meanwhile other calls are served
        ok = service_pb2.ModelInferRequest(model_name="regressor")
        ok.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(0.5)
        assert len(stub.ModelInfer(ok, timeout=30).raw_output_contents) == 1
        unread.cancel()
        channel.close()
        with urllib.request.urlopen(s.url + "/health/live", timeout=10) as r:
            assert r.status == 200
    finally:
        s.stop()


def test_drain_ends_open_streams_cleanly():
    s = Server(ROOT / "models", "--load-model", "regressor", grpc=True)
    channel = grpc.insecure_channel(s.grpc_addr)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    go_on = threading.Event()

    def one_then_wait():
        r = service_pb2.ModelInferRequest(model_name="regressor", id="first")
        r.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(0.5)
        yield r
        go_on.wait(30)

    try:
        responses = stub.ModelStreamInfer(one_then_wait(), timeout=60)
        first = next(responses)
        assert first.error_message == "" and first.infer_response.id == "first"
        s.proc.terminate()
        # the server ends the stream with OK (no error) and exits
        rest = list(responses)
        assert rest == []
        assert s.proc.wait(timeout=30) == 0
    finally:
        go_on.set()
        channel.close()
        s.stop()


# ----------------------------------------------------------------------------- generation

LLM = ROOT / ".fixtures" / "llm" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    if not (LLM / "reference.json").exists():
        pytest.fail(f"no SmolLM2 checkpoint in {LLM}: run `make llm-fixtures`")
    repo = tmp_path_factory.mktemp("grpc-gen")
    (repo / "smol").mkdir()
    (repo / "smol" / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{LLM}"\nkv_cache_tokens = 4096\n')
    s = Server(repo, grpc=True)
    yield s
    s.stop()


def generation_inputs(prompt, sampling, stream=None, exclude=None):
    inputs = [bytes_input(tg, "text_input", [prompt.encode()]),
              bytes_input(tg, "sampling_parameters", [json.dumps(sampling).encode()])]
    for name, value in [("stream", stream), ("exclude_input_in_output", exclude)]:
        if value is not None:
            i = tg.InferInput(name, [1], "BOOL")
            i.set_data_from_numpy(np.array([value], dtype=bool))
            inputs.append(i)
    for i in inputs[:2]:  # BYTES [1, 1] -> [1], as Triton's vLLM examples send them
        i._input.ClearField("shape")
        i._input.shape.extend([1])
    return inputs


def completion(gen, prompt, max_tokens):
    body = {"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(gen.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]


def test_generation_unary_and_token_stream(gen):
    prompt, sampling = "The capital of France is", {"max_tokens": 12, "temperature": 0}
    want = completion(gen, prompt, 12)
    c = tg.InferenceServerClient(gen.grpc_addr)
    try:
        meta = c.get_model_metadata("smol")
        assert [i.name for i in meta.inputs] == ["text_input", "stream", "sampling_parameters",
                                                 "exclude_input_in_output"]
        r = c.infer("smol", generation_inputs(prompt, sampling, exclude=True))
        assert r.as_numpy("text_output")[0].decode() == want["text"]
        assert r.get_response().parameters["finish_reason"].string_param == want["finish_reason"]
        # without exclude_input_in_output the prompt comes first, as vLLM's backend answers
        r = c.infer("smol", generation_inputs(prompt, sampling))
        assert r.as_numpy("text_output")[0].decode() == prompt + want["text"]
        # streamed: pieces as they are generated, then an empty final response
        pieces = queue.Queue()
        c.start_stream(callback=lambda result, error: pieces.put((result, error)))
        c.async_stream_infer("smol", generation_inputs(prompt, sampling, stream=True), request_id="g",
                             enable_empty_final_response=True)
        got = []
        while True:
            result, error = pieces.get(timeout=120)
            assert error is None, error
            resp = result.get_response()
            assert resp.id == "g"
            got.append((result.as_numpy("text_output")[0].decode(),
                        resp.parameters["triton_final_response"].bool_param))
            if got[-1][1]:
                break
        c.stop_stream()
        assert len(got) > 2 and got[-1][0] == ""
        assert "".join(t for t, _ in got) == want["text"]
        # refused, naming what is wrong
        with pytest.raises(InferenceServerException) as e:
            c.infer("smol", generation_inputs(prompt, sampling, stream=True))
        assert "ModelStreamInfer" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            c.infer("smol", generation_inputs(prompt, {"max_tokens": 4, "best_of": 2}))
        assert "best_of" in str(e.value) and "INVALID_ARGUMENT" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            c.infer("smol", generation_inputs(prompt, {"max_tokens": 100000}))
        assert "context length" in str(e.value)
    finally:
        c.close()


def test_lazy_generation_loads_on_the_first_grpc_request(tmp_path):
    tiny = ROOT / ".fixtures" / "llm" / "llama-gqa"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.toml").write_text(
        f'kind = "text-generation"\n[generation]\ncheckpoint = "{tiny}"\nkv_cache_tokens = 1024\n')
    s = Server(tmp_path, "--model-control", "lazy", grpc=True)
    c = tg.InferenceServerClient(s.grpc_addr)
    state = lambda: json.load(urllib.request.urlopen(s.url + "/v1/models/tiny"))["versions"][0]["state"]  # noqa: E731
    try:
        assert state() == "unloaded"
        sampling = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
        # streamed first: the load happens under the stream's request
        pieces = queue.Queue()
        c.start_stream(callback=lambda result, error: pieces.put((result, error)))
        c.async_stream_infer("tiny", generation_inputs("Once upon", sampling, stream=True),
                             request_id="lazy", enable_empty_final_response=True)
        got = []
        while True:
            result, error = pieces.get(timeout=120)
            assert error is None, error
            got.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
        assert state() == "ready"
        r = c.infer("tiny", generation_inputs("Once upon", sampling, exclude=True))
        assert r.as_numpy("text_output")[0].decode() == "".join(got) != ""
    finally:
        c.close()
        s.stop()


def test_through_nginx_grpc_pass(server, tmp_path):
    """deploy/nginx/nginx.conf as docker compose runs it, pointed at this server on loopback:
    gRPC calls pass through nginx's grpc_pass (HTTP/2 on both sides)."""
    import re
    import shutil
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is missing: make test installs it (.ci/test-tools.sh)")
    conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
    http_port, grpc_port = server.addr.rsplit(":", 1)[1], server.grpc_addr.rsplit(":", 1)[1]
    front_http, front_grpc = free_port(), free_port()
    conf = re.sub(r"server aiaas-\d:8080 resolve", f"server 127.0.0.1:{http_port}", conf)
    conf = re.sub(r"server aiaas-\d:8081 resolve", f"server 127.0.0.1:{grpc_port}", conf)
    conf = conf.replace("listen 8081 http2;", f"listen 127.0.0.1:{front_grpc} http2;")
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{front_http};")
    conf = conf.replace("/etc/nginx/aiaas-proxy.conf", str(ROOT / "deploy/nginx/proxy.conf"))
    conf = conf.replace("access_log /dev/stdout upstream;", f"access_log {tmp_path}/access.log upstream;")
    os.chmod(tmp_path, 0o755)
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-e", f"{tmp_path}/error.log", "-c",
                             f"{tmp_path}/nginx.conf", "-g", f"pid {tmp_path}/nginx.pid; daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = tg.InferenceServerClient(f"127.0.0.1:{front_grpc}")
        deadline = time.time() + 20
        while True:
            try:
                assert c.is_server_ready()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError((tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else "nginx failed")
                time.sleep(0.2)
        xs = np.array([[0.0], [0.5]], dtype=np.float32)
        direct = tg.InferenceServerClient(server.grpc_addr).infer("regressor", [fp32_input(tg, "x", xs)]).as_numpy("y")
        via = c.infer("regressor", [fp32_input(tg, "x", xs)]).as_numpy("y")
        np.testing.assert_allclose(via, direct, rtol=1e-6)
        # a streamed call through the proxy, and an error status passed through unchanged
        results = queue.Queue()
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        c.async_stream_infer("regressor", [fp32_input(tg, "x", xs)], request_id="via-nginx")
        result, error = results.get(timeout=30)
        c.stop_stream()
        assert error is None and result.get_response().id == "via-nginx"
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata("no-such-model")
        assert "NOT_FOUND" in str(e.value)
        c.close()
        assert " 200 " in (tmp_path / "access.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_unary_message_that_stalls_is_cut_at_the_body_timeout():
    """A raw HTTP/2 client (the h2 package) sends a ModelInfer call's headers and the first
    bytes of a message that claims 1000, then nothing: the server ends the call after
    --body-timeout instead of waiting for the rest, and goes on serving."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    s = Server(ROOT / "models", "--load-model", "regressor", "--body-timeout", "1", grpc=True)
    try:
        host, port = s.grpc_addr.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=15)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", s.grpc_addr),
                                   (":path", "/inference.GRPCInferenceService/ModelInfer"),
                                   ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(stream, b"\x00" + (1000).to_bytes(4, "big") + b"\x0a\x09regressor")
        sock.sendall(conn.data_to_send())
        started = time.monotonic()
        ended, status = False, None
        while not ended and time.monotonic() - started < 15:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(event.headers).get(b"grpc-status", status)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
        took = time.monotonic() - started
        sock.close()
        assert ended, "the stalled call was never ended"
        assert status not in (None, b"0"), status  # an error status, not OK
        assert took < 10
        # and the server serves the next caller
        assert tg.InferenceServerClient(s.grpc_addr).is_server_live()
    finally:
        s.stop()
