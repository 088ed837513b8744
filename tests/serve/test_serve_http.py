"""The HTTP server on loopback (real uvicorn, real model): masks, limits, overload, auth, metrics, shutdown."""

import io
import json
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from wsclip.io import decode_image_bytes, read_mask
from wsclip.serve.labelers import LabelerConfig, load_labeler, rle_decode
from wsclip.serve.server import BackgroundServer, ServeConfig, create_app
from cli_server import start_cli_server

MAX_PIXELS = 600 * 600
MAX_BODY = 2 * 2**20


@pytest.fixture(scope="module")
def labeler(cam_ckpt):
    return load_labeler(LabelerConfig(model=str(cam_ckpt), device="cpu", batch_size=8))


def _server(labeler, **kw):
    cfg = ServeConfig(port=0, max_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY, warmup_hw=(32, 32), **kw)
    return BackgroundServer(create_app(labeler, cfg), cfg)


@pytest.fixture(scope="module")
def server(labeler):
    srv = _server(labeler, max_queue_delay_ms=2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jpeg(voc14) -> bytes:
    return (voc14 / "JPEGImages" / "2007_000033.jpg").read_bytes()


def _png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h black pixels: a few hundred KB that would decode to w*h pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    rows = (b"\x00" * (1 + (w + 7) // 8)) * 1000
    idat = b"".join(comp.compress(rows) for _ in range(h // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_masks_are_the_labelers_masks(server, labeler, jpeg):
    c = httpx.Client(base_url=server.url, timeout=60)
    image = decode_image_bytes(jpeg)
    y = np.zeros(20, np.float32)
    y[[0, 14]] = 1
    (expect,) = labeler.label_batch([image], [y])
    r = c.post("/v1/label", files={"image": ("a.jpg", jpeg, "image/jpeg")}, data={"labels": "aeroplane,person"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-wsclip-labels"] == "aeroplane,person" and r.headers["x-wsclip-predicted"] == "false"
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert Image.open(io.BytesIO(r.content)).mode == "P" and np.array_equal(mask, expect.mask)
    # raw body + query options, RLE output, labels as 1-based indices
    r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"}, params={"labels": "1,15", "format": "rle"})
    body = r.json()
    assert r.status_code == 200 and body["labels"] == ["aeroplane", "person"] and body["label_ids"] == [1, 15]
    decoded = np.zeros_like(expect.mask)
    for a in body["annotations"]:
        decoded[rle_decode(a["segmentation"])] = a["category_id"]
    assert np.array_equal(decoded, expect.mask)
    # no labels: predicted from the CAM network's scores, as the labeler does
    (pred,) = labeler.label_batch([image], [None])
    r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"})
    assert r.headers["x-wsclip-predicted"] == "true"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pred.mask)
    # batch endpoint: per-image status
    files = [("images", ("a.jpg", jpeg, "image/jpeg")), ("images", ("b.jpg", jpeg[:500], "image/jpeg")),
             ("images", ("c.png", _png_bytes(image[:40, :50]), "image/png"))]
    r = c.post("/v1/label/batch", files=files, data={"labels": json.dumps([["aeroplane", "person"], None, [1]]),
                                                     "format": "png"})
    res = r.json()["results"]
    assert r.status_code == 200 and [x["status"] for x in res] == [200, 400, 200]
    import base64

    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(res[0]["mask_png_base64"]))))
    assert np.array_equal(first, expect.mask) and res[2]["labels"] == ["aeroplane"]


def test_bad_requests_get_4xx(server, jpeg):
    c = httpx.Client(base_url=server.url, timeout=60)

    def post(content, ctype="image/jpeg", **kw):
        return c.post("/v1/label", content=content, headers={"content-type": ctype}, **kw)

    assert post(jpeg[: len(jpeg) // 2]).status_code == 400  # truncated JPEG
    assert post(b"").status_code == 400  # zero-byte body
    assert post(b"%PDF-1.4 definitely not an image", "image/png").status_code == 400  # non-image
    assert post(jpeg, "text/plain").status_code == 415  # wrong content type
    r = c.post("/v1/label", files={"image": ("a.txt", jpeg, "text/plain")})
    assert r.status_code == 415
    big = np.zeros((700, 700, 3), np.uint8)  # 490000 pixels > 360000
    r = post(_png_bytes(big), "image/png")
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    bomb = _png_bomb(20000, 20000)  # 400 M pixels in ~100 KB
    assert len(bomb) < 500_000
    assert post(bomb, "image/png").status_code == 413
    r = post(b"\xff" * (MAX_BODY + 1))  # Content-Length over the limit
    assert r.status_code == 413
    r = post(iter([b"\xff" * 2**20] * 3))  # chunked, no Content-Length: counted while streaming
    assert r.status_code == 413
    assert post(jpeg, params={"labels": "unicorn"}).status_code == 422
    assert post(jpeg, params={"format": "gif"}).status_code == 422
    assert post(jpeg, params={"method": "seg"}).status_code == 422
    assert c.post("/v1/label", files={"other": ("a.jpg", jpeg, "image/jpeg")}).status_code == 422
    assert c.post("/v1/label/batch", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 415
    tiny = _png_bytes(np.zeros((8, 8, 3), np.uint8))
    too_many = [("images", (f"{i}.png", tiny, "image/png")) for i in range(ServeConfig.max_batch_items + 1)]
    r = c.post("/v1/label/batch", files=too_many)
    assert r.status_code == 413 and "images in one request" in r.json()["error"]
    assert c.get("/health/ready").status_code == 200  # still healthy
    assert post(jpeg, params={"labels": "cat"}).status_code == 200


def _concurrent_posts(srv, jpeg: bytes, n: int) -> list:
    """n label requests at once, each from its own client."""
    def one(_):
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            return c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"},
                          params={"labels": "aeroplane"})

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_overload_gives_429_then_recovers(labeler, jpeg):
    with _server(labeler, max_queue=1, max_batch_size=1, max_queue_delay_ms=0, retry_after_s=2) as srv:
        responses = _concurrent_posts(srv, jpeg, 16)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429, 503} and 200 in codes
        busy = [r for r in responses if r.status_code in (429, 503)]
        assert busy, codes
        assert all(r.headers.get("retry-after") for r in busy)
        c = httpx.Client(base_url=srv.url, timeout=60)
        assert c.get("/health/ready").status_code == 200
        r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"}, params={"labels": "1"})
        assert r.status_code == 200
        metrics = c.get("/metrics").text
        assert 'wsclip_requests_total{endpoint="label",status="429"}' in metrics


def test_too_many_open_requests_get_503_with_retry_after(labeler, jpeg):
    """Past max_connections open requests: 503 + Retry-After from wsclip (counted), not a bare uvicorn 503."""
    with _server(labeler, max_queue=64, max_batch_size=1, max_queue_delay_ms=0, max_connections=2,
                 retry_after_s=3) as srv:
        responses = _concurrent_posts(srv, jpeg, 10)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        assert all(r.headers.get("retry-after") == "3" for r in responses if r.status_code == 503)
        c = httpx.Client(base_url=srv.url, timeout=60)
        assert c.get("/health/live").status_code == 200  # health stays reachable under overload
        metrics = c.get("/metrics").text
        assert 'wsclip_requests_total{endpoint="label",status="503"}' in metrics
        r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"}, params={"labels": "1"})
        assert r.status_code == 200


def test_bearer_token(labeler, jpeg):
    with _server(labeler, token="s3cret") as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg", "authorization": "Bearer nope"})
        assert r.status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/health/live").status_code == 200
        r = c.post("/v1/label", content=jpeg, params={"labels": "1"},
                   headers={"content-type": "image/jpeg", "authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_metrics_parse_and_openapi(server, jpeg):
    from prometheus_client.parser import text_string_to_metric_families

    c = httpx.Client(base_url=server.url, timeout=60)
    c.post("/v1/label", content=b"", headers={"content-type": "image/jpeg"})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("wsclip_requests", "wsclip_request_latency_seconds", "wsclip_queue_depth", "wsclip_batch_size",
                 "wsclip_images_per_second", "wsclip_images", "wsclip_gpu_memory_bytes", "wsclip_ready"):
        assert name in fams, name
    reqs = {(s.labels.get("endpoint"), s.labels.get("status")): s.value for s in fams["wsclip_requests"].samples
            if s.name == "wsclip_requests_total"}
    assert reqs.get(("label", "400"), 0) >= 1
    batches = [s for s in fams["wsclip_batch_size"].samples if s.name == "wsclip_batch_size_count"]
    assert batches and batches[0].value >= 1
    assert [s.value for s in fams["wsclip_ready"].samples] == [1.0]
    schema = c.get("/openapi.json").json()
    assert {"/v1/label", "/v1/label/batch", "/health/ready", "/metrics"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/label"]["post"]["requestBody"]["content"]


def test_not_ready_while_the_model_cannot_load(tmp_path, jpeg):
    missing = LabelerConfig(model=str(tmp_path / "missing.safetensors"))
    cfg = ServeConfig(port=0)  # default: the server exits when its model cannot load
    srv = BackgroundServer(create_app(missing, cfg), cfg, wait_ready=None)
    srv.thread.join(30)
    assert not srv.thread.is_alive() and srv.server.fatal and "missing.safetensors" in srv.server.fatal
    srv.stop()
    cfg = ServeConfig(port=0, exit_on_load_failure=False)
    srv = BackgroundServer(create_app(missing, cfg), cfg, wait_ready=None)
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        t_end = time.monotonic() + 30
        while srv.service.error is None and time.monotonic() < t_end:
            time.sleep(0.02)
        assert c.get("/health/live").status_code == 200
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "missing.safetensors" in r.json()["error"]
        assert c.post("/v1/label", content=jpeg, headers={"content-type": "image/jpeg"}).status_code == 503
    finally:
        srv.stop()


def test_graceful_shutdown_finishes_in_flight_requests(labeler, jpeg):
    srv = _server(labeler, max_batch_size=2)
    files = [("images", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(6)]
    out = {}

    def slow():
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            out["r"] = c.post("/v1/label/batch", files=files, data={"labels": json.dumps([[1]] * 6)})

    t = threading.Thread(target=slow)
    t.start()
    t_end = time.monotonic() + 60
    while srv.service.batcher.in_flight == 0 and time.monotonic() < t_end:
        time.sleep(0.002)
    assert srv.service.batcher.in_flight > 0
    srv.stop()  # what SIGTERM does: not ready at once, stop accepting, finish in-flight work
    t.join(60)
    assert out["r"].status_code == 200 and [x["status"] for x in out["r"].json()["results"]] == [200] * 6
    assert not srv.thread.is_alive() and not srv.service.ready
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/health/live", timeout=2)


def test_cli_serve_answers_curl_and_stops_on_sigterm(cam_ckpt, voc14, tmp_path):
    proc, url = start_cli_server("--model", str(cam_ckpt))
    try:
        out = tmp_path / "mask.png"
        image = voc14 / "JPEGImages" / "2007_000033.jpg"
        curl = subprocess.run(["curl", "-sS", "-f", "-F", f"image=@{image};type=image/jpeg", "-F", "labels=aeroplane",
                               "-o", str(out), f"{url}/v1/label"], capture_output=True, text=True, timeout=60) \
            if os.path.exists("/usr/bin/curl") else None
        if curl is None:  # no curl binary: the same multipart request with httpx
            r = httpx.post(f"{url}/v1/label", files={"image": ("a.jpg", image.read_bytes(), "image/jpeg")},
                           data={"labels": "aeroplane"}, timeout=60)
            out.write_bytes(r.content)
        else:
            assert curl.returncode == 0, curl.stderr
        mask = read_mask(out)
        assert mask.shape == (513, 513) and set(np.unique(mask)) <= {0, 1}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
