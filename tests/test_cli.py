import json
import subprocess
import sys

from wsclip import __version__
from wsclip.cli import build_parser, main


def test_help_lists_jobs(capsys):
    parser = build_parser()
    text = parser.format_help()
    for job in ("doctor", "eval"):
        assert job in text


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
