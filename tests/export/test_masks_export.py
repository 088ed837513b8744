"""Mask exports read back by the libraries that load them: pycocotools (COCO), Label Studio's own brush
RLE code (label-studio-converter), datumaro (what CVAT imports "Segmentation mask 1.1" with) and
FiftyOne's COCO importer; the last two where an interpreter with them is given
(WSCLIP_DATUMARO_PYTHON, WSCLIP_FIFTYONE_PYTHON: they pin other numpy/pillow/starlette versions
than wsclip's environment, so they live in their own virtual environments)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsclip.cli import main
from wsclip.errors import WsclipError
from wsclip.export.masks import (IGNORE_COLOR, export_masks, ls_rle_decode, ls_rle_encode, regions)
from wsclip.io import atomic_write_json, write_mask
from wsclip.serve.folder import LabeledFolder

CLASSES = ("cat", "dog", "boat")
HERE = Path(__file__).parent


def _random_mask(rng, h, w):
    from scipy import ndimage

    m = np.zeros((h, w), np.uint8)
    for v in rng.choice([1, 2, 3], size=rng.integers(1, 4), replace=False):
        blob = ndimage.binary_opening(rng.random((h, w)) < 0.35) | (rng.random((h, w)) < 0.01)
        m[blob] = v
    m[rng.random((h, w)) < 0.04] = 255
    return m


@pytest.fixture()
def folder(tmp_path):
    """A labelled folder: odd sizes, an empty mask, ignore pixels, many regions, an id in a subfolder."""
    rng = np.random.default_rng(0)
    root, photos = tmp_path / "out", tmp_path / "photos"
    sizes = {"a": (37, 53), "b": (64, 48), "sub/c": (29, 31), "d": (16, 20), "e": (300, 301)}
    lines = []
    for n, (i, (h, w)) in enumerate(sizes.items()):
        m = np.zeros((h, w), np.uint8) if i == "d" else _random_mask(rng, h, w)
        if i == "e":
            m[:] = 2  # one huge run (> 2^16 RGBA values in Label Studio's RLE)
            m[100:140, 7:70] = 1
        write_mask(root / f"{i}.png", m)
        p = photos / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        lines.append(json.dumps({"id": i, "status": "ok", "size": [h, w], "labels": [], "image": str(p),
                                 "quality": {"score": round(0.1 * n, 3)}}))
    lines.append(json.dumps({"id": "failed", "status": "error", "error": "bad file"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    atomic_write_json(root / "classes.json", list(CLASSES))
    return LabeledFolder(root)


def _expected(folder, i, ignore_as=0):
    m = folder.mask(i)
    return np.where(m == 255, ignore_as, m).astype(np.uint8)


def test_coco_reads_back_through_pycocotools_pixel_for_pixel(folder, tmp_path):
    from pycocotools.coco import COCO

    folder.set_mark("b", "rejected")
    for instances in (False, True):
        out = tmp_path / f"coco_{instances}.json"
        info = export_masks(folder, out, "coco", instances=instances)
        assert info["images"] == 4 and info["left_out"] == 1
        coco = COCO(str(out))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        seen = set()
        for img in coco.dataset["images"]:
            i = img["wsclip_id"]
            seen.add(i)
            assert img["file_name"] == f"{i}.jpg"
            got = np.zeros((img["height"], img["width"]), np.uint8)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                b = coco.annToMask(ann).astype(bool)
                assert not (got[b] > 0).any(), "annotations overlap"
                got[b] = ann["category_id"]
                assert ann["area"] == int(b.sum())
                ys, xs = np.nonzero(b)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                if instances:
                    from scipy import ndimage

                    assert ndimage.label(b, structure=np.ones((3, 3)))[1] == 1
            np.testing.assert_array_equal(got, _expected(folder, i))
        assert seen == {"a", "sub/c", "d", "e"}
    n_sem = len(json.loads((tmp_path / "coco_False.json").read_text())["annotations"])
    assert len(json.loads((tmp_path / "coco_True.json").read_text())["annotations"]) > n_sem


def test_label_studio_rle_is_byte_identical_to_label_studio_own_encoder():
    brush = pytest.importorskip("label_studio_converter.brush", reason="label-studio-converter is in the dev extra")
    rng = np.random.default_rng(3)
    cases = [np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((3, 5), bool), np.ones((300, 301), bool)]
    cases += [rng.random(s) < p for s in ((2, 4), (17, 33), (64, 64), (129, 257)) for p in (0.02, 0.5, 0.98)]
    for b in cases:
        ours = ls_rle_encode(b)
        assert ours == list(brush.mask2rle((b * 255).astype(np.uint8))), b.shape
        ref = brush.decode_rle(ours).reshape(*b.shape, 4)
        np.testing.assert_array_equal(ref[..., 3] > 0, b)
        np.testing.assert_array_equal(ls_rle_decode(ours).reshape(*b.shape, 4), ref)  # our decoder agrees


def test_label_studio_tasks_decode_to_the_masks(folder, tmp_path):
    import xml.etree.ElementTree as ET

    brush = pytest.importorskip("label_studio_converter.brush", reason="label-studio-converter is in the dev extra")
    folder.set_mark("a", "rejected")
    out = tmp_path / "ls.json"
    info = export_masks(folder, out, "labelstudio", url_prefix="/data/local-files/?d=photos/")
    tasks = json.loads(out.read_text())
    cfg = ET.fromstring(Path(info["labeling_config"]).read_text())
    names = [lab.get("value") for lab in cfg.iter("Label")]
    assert names == list(CLASSES) and cfg.find("BrushLabels").get("name") == "tag"
    assert [t["data"]["wsclip_id"] for t in tasks] == ["b", "sub/c", "d", "e"]
    for t in tasks:
        i = t["data"]["wsclip_id"]
        assert t["data"]["image"] == f"/data/local-files/?d=photos/{i}.jpg"
        pred = t["predictions"][0]
        exp = _expected(folder, i)
        got = np.zeros_like(exp)
        for r in pred["result"]:
            assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
            h, w = r["original_height"], r["original_width"]
            alpha = brush.decode_rle(r["value"]["rle"]).reshape(h, w, 4)[..., 3]
            got[alpha > 0] = names.index(r["value"]["brushlabels"][0]) + 1
        np.testing.assert_array_equal(got, exp)
        assert len(pred["result"]) == len(set(np.unique(exp)) - {0})


def _cvat_decode(zpath):
    """An independent reader of the zip: labelmap colours -> class values (None when a colour is undeclared)."""
    with zipfile.ZipFile(zpath) as z:
        lm = [ln.split(":") for ln in z.read("labelmap.txt").decode().splitlines() if ln and not ln.startswith("#")]
        colours = {tuple(int(c) for c in parts[1].split(",")): parts[0] for parts in lm}
        ids = z.read("ImageSets/Segmentation/default.txt").decode().split()
        masks, objects = {}, {}
        for i in ids:
            rgb = np.asarray(Image.open(z.open(f"SegmentationClass/{i}.png")).convert("RGB"))
            masks[i] = rgb
            objects[i] = np.asarray(Image.open(z.open(f"SegmentationObject/{i}.png")))
    return [p[0] for p in lm], colours, ids, masks, objects


@pytest.mark.parametrize("ignore", ["label", "background"])
def test_cvat_zip_declares_every_colour_and_decodes_to_the_masks(folder, tmp_path, ignore):
    folder.set_mark("d", "rejected")
    out = tmp_path / "cvat.zip"
    info = export_masks(folder, out, "cvat", ignore=ignore)
    names, colours, ids, masks, objects = _cvat_decode(out)
    assert ids == ["a", "b", "sub/c", "e"]
    assert names[:4] == ["background", *CLASSES]
    assert (names[4:] == ["ignore"]) == (ignore == "label") == info["ignore_declared"]
    for i in ids:
        rgb = masks[i]
        used = {tuple(c) for c in rgb.reshape(-1, 3)}
        assert used <= set(colours), f"undeclared colours {used - set(colours)}"
        lut = {c: (255 if n == "ignore" else names.index(n)) for c, n in colours.items()}
        got = np.array([lut[tuple(c)] for c in rgb.reshape(-1, 3)], np.uint8).reshape(rgb.shape[:2])
        np.testing.assert_array_equal(got, _expected(folder, i, 255 if ignore == "label" else 0))
        obj = objects[i]  # instances: one index per 8-connected region, each inside one class
        exp = _expected(folder, i, 255 if ignore == "label" else 0)
        assert ((obj == 0) == (exp == 0)).all() and ((obj == 255) == (exp == 255)).all()
        assert len(set(np.unique(obj)) - {0, 255}) == len(regions(exp, instances=True))
    if os.environ.get("WSCLIP_DATUMARO_PYTHON"):
        res = subprocess.run([os.environ["WSCLIP_DATUMARO_PYTHON"], str(HERE / "datumaro_check.py"), str(out),
                              str(folder.root), ignore], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout.strip().splitlines()[-1])["pixels_differing"] == 0


def test_fiftyone_folder_has_photos_and_a_bbox_on_every_rle(folder, tmp_path):
    out = tmp_path / "fo"
    export_masks(folder, out, "fiftyone")
    coco = json.loads((out / "labels.json").read_text())
    for img in coco["images"]:
        assert (out / "data" / img["file_name"]).is_file()
    assert coco["annotations"] and all(len(a["bbox"]) == 4 and a["segmentation"]["counts"] for a in coco["annotations"])
    python = os.environ.get("WSCLIP_FIFTYONE_PYTHON")
    if python is None:
        try:
            import fiftyone  # noqa: F401
            python = sys.executable
        except ImportError:
            pytest.skip("fiftyone is not installed here (its MongoDB download is blocked; see README)")
    res = subprocess.run([python, str(HERE / "fiftyone_check.py"), str(out), str(folder.root)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["pixels_differing"] == 0


def test_marks_accept_only_and_errors(folder, tmp_path):
    folder.set_mark("a", "accepted")
    folder.set_mark("e", "accepted")
    folder.set_mark("e", None)
    assert folder.marks() == {"a": "accepted"}
    assert folder.kept_ids(only_accepted=True) == ["a"]
    info = export_masks(folder, tmp_path / "x.json", "coco", only_accepted=True)
    assert info["images"] == 1
    with pytest.raises(WsclipError, match="accepted"):
        folder.set_mark("a", "maybe")
    with pytest.raises(WsclipError, match="no labelled image"):
        folder.set_mark("nope", "rejected")
    for i in folder.ids:
        folder.set_mark(i, "rejected")
    with pytest.raises(WsclipError, match="left to export"):
        export_masks(folder, tmp_path / "y.json", "coco")
    with pytest.raises(WsclipError, match="unknown export format"):
        export_masks(folder, tmp_path / "y.json", "yolo")


def test_cli_export_masks(folder, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["export", "masks", str(folder.root), "--format", "coco", "--out", str(out)]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["images"]) == 5
    assert main(["export", "masks", str(tmp_path / "missing"), "--format", "coco", "--out", str(out)]) == 2
    assert "labelled folder not found" in capsys.readouterr().err
    (folder.root / "classes.json").unlink()
    assert main(["export", "masks", str(folder.root), "--format", "cvat", "--out", str(tmp_path / "z.zip")]) == 2
    assert "--classes" in capsys.readouterr().err
    assert main(["export", "masks", str(folder.root), "--format", "cvat", "--classes", str(_classes_file(tmp_path)),
                 "--out", str(tmp_path / "z.zip")]) == 0


def _classes_file(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("\n".join(CLASSES) + "\n")
    return p


def test_a_pseudo_folder_with_images_given_exports_and_lists(tmp_path):
    """`wsclip pseudo` output (masks + quality.json, no manifest): photos from --images, classes from --classes."""
    rng = np.random.default_rng(5)
    root, photos = tmp_path / "pseudo", tmp_path / "photos"
    photos.mkdir()
    quality = {}
    for n in range(3):
        m = _random_mask(rng, 21, 34)
        write_mask(root / f"p{n}.png", m)
        Image.fromarray(rng.integers(0, 255, (21, 34, 3), dtype=np.uint8)).save(photos / f"p{n}.png")
        quality[f"p{n}"] = {"score": 0.5 - 0.1 * n}
    atomic_write_json(root / "quality.json", quality)
    with pytest.raises(WsclipError, match="--classes"):
        LabeledFolder(root).classes
    lf = LabeledFolder(root, images=str(photos), classes=_classes_file(tmp_path))
    assert [r["id"] for r in lf.worst()] == ["p2", "p1", "p0"]
    assert lf.image("p1").shape == (21, 34, 3)
    export_masks(lf, tmp_path / "fo", "fiftyone")
    assert sorted(p.name for p in (tmp_path / "fo" / "data").iterdir()) == ["p0.png", "p1.png", "p2.png"]
    with pytest.raises(WsclipError, match="--images"):
        export_masks(LabeledFolder(root, classes=list(CLASSES)), tmp_path / "fo2", "fiftyone")
