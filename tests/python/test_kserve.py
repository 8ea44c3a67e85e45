"""KServe's Python SDK (InferenceRESTClient, v2 REST) against aiaas, values checked against /v1."""

import asyncio
import json
import urllib.request

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from conftest import draw_shape, pixels_chw, png_bytes


def v1(server, model, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{server.url}/v1/models/{model}/predict", data=data,
                                 headers={"content-type": content_type})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)["predictions"]


def run(coro):
    return asyncio.run(coro)


async def with_client(f):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        return await f(client)
    finally:
        await client.close()


def test_liveness_and_readiness(server):
    async def check(c):
        assert await c.is_server_live(server.url)
        assert await c.is_server_ready(server.url)
        for m in ["regressor", "text-classifier", "image-cnn"]:
            assert await c.is_model_ready(server.url, m)
        assert not await c.is_model_ready(server.url, "no-such-model")
    run(with_client(check))


def test_infer_each_demo_model(server):
    xs = np.array([[0.25], [0.75]], dtype=np.float32)
    images = [draw_shape(k, 10 + i) for i, k in enumerate(["triangle", "circle", "square"])]
    batch = np.stack([pixels_chw(i) for i in images]).astype(np.float32)
    texts = np.array(["我们将一起前进", "The service was awful and rude"], dtype=object)

    async def infer(c):
        out = {}
        x = InferInput("x", list(xs.shape), "FP32")
        x.set_data_from_numpy(xs, binary_data=False)
        out["regressor"] = await c.infer(server.url, InferRequest("regressor", [x]), model_name="regressor")
        img = InferInput("image", list(batch.shape), "FP32")
        img.set_data_from_numpy(batch, binary_data=True)  # the binary tensor extension
        out["image-cnn"] = await c.infer(server.url, InferRequest("image-cnn", [img]), model_name="image-cnn")
        t = InferInput("text", [2], "BYTES")
        t.set_data_from_numpy(texts, binary_data=False)
        out["text-classifier"] = await c.infer(server.url, InferRequest("text-classifier", [t]), model_name="text-classifier")
        return out

    out = run(with_client(infer))
    y = out["regressor"].outputs[0].as_numpy().ravel()
    np.testing.assert_allclose(y, v1(server, "regressor", {"instances": [[0.25], [0.75]]}), rtol=1e-6)

    got = {o.name: o.as_numpy() for o in out["image-cnn"].outputs}
    expected = [v1(server, "image-cnn", png_bytes(i), "image/png")[0] for i in images]
    np.testing.assert_allclose(got["scores"], [[e["scores"][k] for k in ["circle", "square", "triangle"]] for e in expected], atol=1e-5)
    assert [str(l[0], "utf-8") if isinstance(l[0], bytes) else l[0] for l in got["labels"]] == [e["label"] for e in expected]

    got = {o.name: o.as_numpy() for o in out["text-classifier"].outputs}
    expected = v1(server, "text-classifier", {"instances": list(texts)})
    np.testing.assert_allclose(got["scores"], [[e["scores"]["negative"], e["scores"]["positive"]] for e in expected], atol=1e-6)
    assert [e["label"] for e in expected] == ["positive", "negative"]
