"""wsclip.demo pieces that need no training: the metrics, loss-variant weights, the output-folder guard."""

import json

import numpy as np
import pytest

from wsclip.data.synth import SYNTH_CLASSES, SYNTH_PREFERRED
from wsclip.demo import VARIANTS, DemoConfig, _check_out, cam_metrics, format_table, loss_weights, ranking_auc, slug
from wsclip.errors import WsclipError
from wsclip.label.clims_cam import write_cam_file


class _Val:
    """The slice of the dataset interface cam_metrics reads."""

    classes = SYNTH_CLASSES

    def __init__(self, masks):
        self.masks = masks
        self.ids = [f"val_{i:06d}" for i in range(len(masks))]

    def load_mask(self, i):
        return self.masks[i]


def _scene(size=20):
    """Image 0: a boat (class 0) in a square; image 1: a bird (2) and a car (3)."""
    m0 = np.zeros((size, size), np.uint8)
    m0[5:10, 6:12] = 1
    m1 = np.zeros((size, size), np.uint8)
    m1[2:6, 2:6] = 3
    m1[12:17, 10:18] = 4
    return [m0, m1]


def _write(tmp_path, masks, maps):
    for i, (m, (keys, cams)) in enumerate(zip(masks, maps)):
        write_cam_file(tmp_path / f"val_{i:06d}.npz", np.array(keys), np.asarray(cams)[:, ::4, ::4], np.asarray(cams))


def test_perfect_cams_score_one_and_activate_no_background(tmp_path):
    masks = _scene()
    maps = [([0], [(masks[0] == 1).astype(np.float32)]),
            ([2, 3], [(masks[1] == 3).astype(np.float32), (masks[1] == 4).astype(np.float32)])]
    _write(tmp_path, masks, maps)
    backgrounds = {"val_000000": SYNTH_PREFERRED[0], "val_000001": SYNTH_PREFERRED[2]}
    r = cam_metrics(tmp_path, _Val(masks), backgrounds, fa_margin=0)
    assert r["cam_miou"] == pytest.approx(1.0)
    assert r["co_bg_fa"] == 0.0
    assert r["object_coverage"] == 1.0 and r["object_auc"] == 1.0
    # boat on its water (400 - 30 bg px) + bird on its sky (400 - 16 - 40); the car is not on its road
    assert r["co_bg_pixels"] == (400 - 30) + (400 - 56)


def test_background_activation_counts_only_the_preferred_background_away_from_objects(tmp_path):
    masks = _scene()
    everywhere = np.ones((20, 20), np.float32)
    maps = [([0], [everywhere]), ([2, 3], [everywhere * 0.1, everywhere])]
    _write(tmp_path, masks, maps)
    backgrounds = {"val_000000": SYNTH_PREFERRED[0], "val_000001": SYNTH_PREFERRED[2]}
    r = cam_metrics(tmp_path, _Val(masks), backgrounds, fa_threshold=0.15, fa_margin=2)
    # image 0: the boat's map covers all far background (active); image 1: the bird's 0.1 map is below
    # 0.15 (inactive), the car's full map is ignored (the scene is not on the car's preferred road)
    far = [_far(m, 2) for m in masks]
    assert r["co_bg_pixels"] == far[0].sum() + far[1].sum()
    assert r["co_bg_fa"] == pytest.approx(far[0].sum() / (far[0].sum() + far[1].sum()))
    # coverage: the boat (30 px) and the car (40 px) are covered, the bird's 0.1 map (16 px) is not
    assert r["object_coverage"] == pytest.approx(70 / 86)
    assert r["object_auc"] == pytest.approx(0.5)  # constant maps rank nothing


def test_ranking_auc_matches_the_pair_count():
    rng = np.random.default_rng()
    pos, neg = rng.integers(0, 5, 37).astype(float), rng.integers(0, 5, 23).astype(float)  # many ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert ranking_auc(pos, neg) == pytest.approx(pairs)
    assert ranking_auc(np.ones(3), np.zeros(4)) == 1.0 and ranking_auc(np.zeros(3), np.ones(4)) == 0.0


def _far(mask, margin):
    """Background pixels whose city-block distance to every object pixel exceeds `margin` (brute force)."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(mask.shape, bool)
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            out[y, x] = mask[y, x] == 0 and (np.abs(ys - y) + np.abs(xs - x)).min() > margin
    return out


def test_loss_weights_switch_terms_off():
    cfg = DemoConfig()
    assert loss_weights(cfg, "OTM") == {"alpha": 10.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}
    assert loss_weights(cfg, "OTM+BTM+REG") == {"alpha": 10.0, "beta": 24.0, "gamma": 0.0, "delta": 1.15}
    assert loss_weights(cfg, "OTM+BTM+REG+CBS") == {"alpha": 10.0, "beta": 24.0, "gamma": 1.0, "delta": 1.15}
    assert list(VARIANTS) == ["OTM", "OTM+BTM", "OTM+BTM+REG", "OTM+BTM+REG+CBS"]
    with pytest.raises(WsclipError, match="unknown CLIMS variant"):
        loss_weights(cfg, "OTM+XYZ")
    assert slug("CLIMS OTM+BTM") == "clims-otm-btm" and slug("CLIP-ES + CAA") == "clip-es-caa"


def test_table_lists_every_row():
    rows = {"baseline CAM": {"cam_miou": 0.25, "threshold": 0.3, "mask_miou": 0.3, "refinement": "CRF", "co_bg_fa": 0.5},
            "CLIP-ES GradCAM": {"cam_miou": 0.2, "threshold": None, "mask_miou": None, "co_bg_fa": float("nan")}}
    text = format_table(rows)
    assert "| baseline CAM | 25.0 | 0.30 | 30.0 | CRF | 50.0 |" in text
    assert "| CLIP-ES GradCAM | 20.0 | - | - | - | - |" in text


def test_output_folder_guard(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(WsclipError, match="not a wsclip demo folder"):
        _check_out(DemoConfig(out=str(foreign)), fresh=True)
    assert (foreign / "thesis.tex").is_file()
    out = tmp_path / "demo"
    _check_out(DemoConfig(out=str(out)), fresh=False)
    assert json.loads((out / "demo.json").read_text())["settings"]["cam_steps"] == DemoConfig().cam_steps
    with pytest.raises(WsclipError, match="other settings.*cam_steps"):
        _check_out(DemoConfig(out=str(out), cam_steps=7), fresh=False)
    (out / "old.txt").write_text("x")
    _check_out(DemoConfig(out=str(out), cam_steps=7), fresh=True)
    assert not (out / "old.txt").exists()


def test_effects_are_differences_of_the_named_rows_against_their_targets():
    from wsclip.demo import EFFECTS, effects, format_effects

    rows = {"untrained": {"cam_miou": 0.20}, "baseline CAM": {"cam_miou": 0.12},
            "CLIMS OTM": {"cam_miou": 0.25}, "CLIMS OTM+BTM": {"cam_miou": 0.24},
            "CLIMS OTM+BTM+REG": {"cam_miou": 0.3, "co_bg_fa": 0.40},
            "CLIMS OTM+BTM+REG+CBS": {"cam_miou": 0.35, "co_bg_fa": 0.10},
            "CLIMS OTM+BTM+REG+CBS + RW": {"mask_miou": 0.45},
            "CLIP-ES GradCAM": {"mask_miou": 0.20}, "CLIP-ES + CAA": {"mask_miou": 0.21}}
    got = {e["effect"]: e for e in effects(rows)}
    assert len(got) == len(EFFECTS) - 1  # no "+ CAA + CRF" row: that effect is left out, not invented
    first = got["CLIMS (all terms) over the untrained network, CAM mIoU"]
    assert first["value"] == pytest.approx(0.15) and first["met"]
    assert got["CLIMS (all terms) over the baseline CAM, CAM mIoU"]["value"] == pytest.approx(0.23)
    assert not got["OTM+BTM over OTM alone, CAM mIoU"]["met"]  # -0.01
    assert got["CBS lowers the co-occurring-background FA (OTM+BTM+REG -> +CBS)"]["value"] == pytest.approx(0.30)
    assert not got["CLIP-ES: CAA over GradCAM, pseudo-mask mIoU"]["met"]  # +1 point, target +2
    rw = got["IRN random walk over the CAMs it starts from (pseudo-mask vs CAM mIoU)"]
    assert rw["value"] == pytest.approx(0.10) and rw["met"]
    text = format_effects(effects(rows))
    assert "| OTM+BTM over OTM alone, CAM mIoU | -1.0 | > 0 | no |" in text
