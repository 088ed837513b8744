"""`wsclip review`: the page's API on a real server process (token rule, PNGs, atomic marks), the
/review mount of `wsclip serve`, and the worst-first listings of `wsclip label` / `wsclip review`."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from review_helpers import REVIEW_TOKEN, label_args, start_review
from wsclip.cli import main
from wsclip.io import read_image

AUTH = {"Authorization": f"Bearer {REVIEW_TOKEN}"}


@pytest.fixture()
def review(labelled_synth):
    proc, url = start_review(labelled_synth["out"], "--gt", str(labelled_synth["world"] / "SegmentationClass"))
    try:
        yield url, labelled_synth
    finally:
        proc.terminate()
        proc.wait(30)
        (labelled_synth["out"] / "review.json").unlink(missing_ok=True)


def _png(r) -> np.ndarray:
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_review_api_serves_the_folder_behind_the_token(review):
    url, lab = review
    with httpx.Client(base_url=url, timeout=60, follow_redirects=True) as c:
        page = c.get("/review")  # redirected to /review/; the page itself holds no data
        assert page.status_code == 200 and "review.js" in page.text and str(page.url).endswith("/review/")
        assert c.get("/review/review.js").status_code == 200
        assert c.get("/review/api/meta").status_code == 401
        assert c.get("/review/api/meta", headers={"Authorization": "Bearer wrong"}).status_code == 401
        meta = c.get("/review/api/meta", headers=AUTH).json()
        assert meta["classes"][1:] == ["boat", "train", "bird", "car", "cow", "plane"] and meta["has_gt"]
        images = c.get("/review/api/images", headers=AUTH).json()["images"]
        ids = sorted(p.stem for p in lab["out"].glob("*.png"))
        assert sorted(im["id"] for im in images) == ids
        assert all(0 <= im["score"] <= 1 and im["miou"] is not None for im in images)
        first = images[0]["id"]
        d = c.get("/review/api/image", params={"id": first}, headers=AUTH).json()
        assert d["cams"] == d["classes"] and d["iou"] and "background" in d["iou"]
        photo = _png(c.get("/review/api/photo", params={"id": first}, headers=AUTH))
        np.testing.assert_array_equal(photo, read_image(lab["world"] / "JPEGImages" / f"{first}.jpg"))
        over = _png(c.get("/review/api/overlay", params={"id": first}, headers=AUTH))
        assert over.shape == photo.shape
        heat = _png(c.get("/review/api/cam", params={"id": first, "k": d["cams"][0]}, headers=AUTH))
        assert heat.shape == photo.shape and not np.array_equal(heat, photo)
        missing = [k for k in range(6) if k not in d["cams"]][0]
        assert c.get("/review/api/cam", params={"id": first, "k": missing}, headers=AUTH).status_code == 422
        assert c.get("/review/api/image", params={"id": "nope"}, headers=AUTH).status_code == 404


def test_marks_are_saved_atomically_and_only_from_json_posts(review):
    url, lab = review
    marks_file = lab["out"] / "review.json"
    with httpx.Client(base_url=url, timeout=60) as c:
        ids = [im["id"] for im in c.get("/review/api/images", headers=AUTH).json()["images"]]
        post = lambda body, **kw: c.post("/review/api/mark", headers={**AUTH, **kw.pop("headers", {})}, **kw)  # noqa: E731
        assert c.post("/review/api/mark", json={"id": ids[0], "status": "rejected"}).status_code == 401
        assert post(None, content=json.dumps({"id": ids[0], "status": "rejected"}),
                    headers={"Content-Type": "text/plain"}).status_code == 415
        assert post(None, json={"id": ids[0], "status": "maybe"}).status_code == 422
        assert post(None, json={"id": "nope", "status": "rejected"}).status_code == 404
        assert not marks_file.exists()
        r = post(None, json={"id": ids[0], "status": "rejected"}).json()
        assert r == {"id": ids[0], "mark": "rejected", "accepted": 0, "rejected": 1}
        post(None, json={"id": ids[1], "status": "accepted"})
        saved = json.loads(marks_file.read_text())["marks"]
        assert {k: v["status"] for k, v in saved.items()} == {ids[0]: "rejected", ids[1]: "accepted"}
        post(None, json={"id": ids[1], "status": None})
        assert list(json.loads(marks_file.read_text())["marks"]) == [ids[0]]
        assert not list(lab["out"].glob(".review.json*"))  # no temporary file left behind
    from wsclip.export.masks import export_masks

    info = export_masks(lab["out"], lab["out"].parent / "coco.json", "coco")
    assert info["left_out"] == 1 and info["images"] == len(ids) - 1


def test_serve_mounts_the_review_page_under_its_token(labelled_synth):
    from wsclip.serve.labelers import LabelerConfig, load_labeler
    from wsclip.serve.server import BackgroundServer, ServeConfig, create_app

    cfg = ServeConfig(port=0, token=REVIEW_TOKEN, review=str(labelled_synth["out"]))
    labeler = load_labeler(LabelerConfig(model=str(labelled_synth["ckpt"]), device="cpu", batch_size=2))
    with BackgroundServer(create_app(labeler, cfg), cfg) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/review/").status_code == 200
            assert c.get("/review/api/images").status_code == 401
            assert len(c.get("/review/api/images", headers=AUTH).json()["images"]) == 8
            assert c.get("/health/ready").status_code == 200


def test_label_review_first_and_review_list_print_the_worst(labelled_synth, capsys):
    lab = labelled_synth
    assert main(label_args(lab["world"], lab["ckpt"], lab["out"]) + ["--review-first", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 images (8 already done" in out.replace("labelled 0 images", "0 images")
    rows = out.split("lowest quality score):\n")[1].splitlines()[1:]
    assert len(rows) == 3
    recs = [json.loads(ln) for ln in (lab["out"] / "manifest.jsonl").read_text().splitlines()]
    worst = sorted(recs, key=lambda r: (r["quality"]["score"], r["id"]))[:3]
    assert [r.split()[-1] for r in rows] == [r["id"] for r in worst]
    assert [float(r.split()[1]) for r in rows] == [round(r["quality"]["score"], 2) for r in worst]
    assert all(r["quality"]["miou"] is not None and r["image"].endswith(".jpg") for r in recs)
    assert main(["review", str(lab["out"]), "--list", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    assert main(["review", str(lab["out"].parent / "nothing")]) == 2
