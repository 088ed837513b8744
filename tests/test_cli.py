import json
import subprocess
import sys

from wsclip import __version__
from wsclip.cli import build_parser, main


def _subcommands(parser, prefix=()):
    """Every job path, e.g. ('train', 'clims'), with its parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_help_lists_jobs_and_every_job_describes_its_flags(capsys):
    parser = build_parser()
    text = parser.format_help()
    jobs = dict(_subcommands(parser))
    for job in ("doctor", "eval", "train", "cam", "pseudo", "label", "serve", "export", "bench", "demo"):
        assert job in text and (job,) in jobs
    assert ("train", "clims") in jobs and ("export", "onnx") in jobs
    for path, sub in jobs.items():
        flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        leaf = not any(type(a).__name__ == "_SubParsersAction" for a in sub._actions)
        if leaf:
            assert flags, path
            assert all(a.help for a in flags), (path, [a.dest for a in flags if not a.help])


def test_version_and_no_command(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] and "features" in report
    assert report["features"]["training and labeling (PyTorch)"] is True


def test_user_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "wsclip.cli", "eval", "--pred", str(tmp_path / "x"), "--gt", str(tmp_path / "y")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_doctor_warns_when_both_onnxruntime_builds_are_installed():
    from wsclip.doctor import collect, format_report, warnings_for

    r = collect()
    assert warnings_for(r, ["onnxruntime"]) == [] and warnings_for(r, ["onnxruntime-gpu"]) == []
    both = warnings_for({"onnxruntime_providers": ["CPUExecutionProvider"]}, ["onnxruntime", "onnxruntime-gpu"])
    assert len(both) == 1 and "no CUDA provider" in both[0] and "pip install onnxruntime-gpu" in both[0]
    assert "warning: both onnxruntime" in format_report(dict(r, warnings=both))


def test_label_and_serve_take_every_clip_es_option_cam_takes():
    """`wsclip label/serve --method clip-es` accept each CLIP-ES flag of `wsclip cam` and pass it to ClipEsConfig."""
    from dataclasses import fields

    from wsclip.commands.maps import _clip_es_options
    from wsclip.commands.serving import _labeler_config
    from wsclip.label.clip_es import ClipEsConfig

    parser = build_parser()
    jobs = dict(_subcommands(parser))

    def clip_es_flags(sub):
        return {s for a in sub._actions for s in a.option_strings if a.help and a.help.startswith("[clip-es]")}

    cam_flags = clip_es_flags(jobs[("cam",)]) - {"--batch-size"}  # label/serve have their own --batch-size
    assert len(cam_flags) >= 8
    for job in (("label",), ("serve",)):
        missing = cam_flags - {s for a in jobs[job]._actions for s in a.option_strings}
        assert not missing, (job, missing)
    argv = ["--method", "clip-es", "--clip", "c.pt", "--no-caa", "--box-threshold", "0.6", "--template", "a {}.",
            "--pooling", "mean", "--caa-layers", "3", "--box-compat", "--caa-backend", "torch", "--precision", "bf16",
            "--logit-scale", "50", "--compute", "bf16"]
    want = {"caa": False, "box_threshold": 0.6, "template": "a {}.", "pooling": "mean", "caa_layers": 3,
            "box_compat": True, "caa_backend": "torch", "logit_scale": 50.0,
            "compute": "bf16"}
    cam = parser.parse_args(["cam", "--data", "d", "--out", "o", *argv])
    assert _clip_es_options(cam) == want
    for job in ("label", "serve"):
        args = parser.parse_args([job, *(["--images", "i", "--out", "o"] if job == "label" else []), *argv])
        opts = _labeler_config(args).options
        assert opts == {**want, "precision": "bf16"}
        names = {f.name for f in fields(ClipEsConfig)}
        assert set(want) <= names  # every option is a real ClipEsConfig field
