"""wsclip.runtime: the precision decided for the PyTorch paths (TF32 switches restored, autocast per amp)."""

import warnings

import torch

from wsclip import runtime


def test_inference_turns_tf32_off_and_training_on_then_restores():
    before = runtime.tf32_enabled()
    with runtime.precision("cuda", train=False):  # the switches are plain flags: settable without a GPU
        assert runtime.tf32_enabled() == (False, False)
        with runtime.precision("cuda", train=True):
            assert runtime.tf32_enabled() == (True, True)
        assert runtime.tf32_enabled() == (False, False)
    assert runtime.tf32_enabled() == before
    assert runtime.TF32 == {"inference": False, "train": True}


def test_cpu_changes_nothing_and_amp_is_cuda_only():
    before = runtime.tf32_enabled()
    with runtime.precision("cpu", amp=True, train=True):
        assert runtime.tf32_enabled() == before
        x = torch.randn(4, 4)
        assert (x @ x).dtype == torch.float32  # amp never applies on the CPU
    with runtime.autocast("cpu", amp=True):
        assert not torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" on a CPU machine
        ctx = runtime.autocast(torch.device("cuda"), amp=True)
    assert ctx.device == "cuda" and ctx.fast_dtype == runtime.AMP_DTYPE == torch.bfloat16


def test_the_labelers_and_the_loop_use_it():
    """One place: no module outside runtime.py sets autocast or the TF32 switches itself."""
    from pathlib import Path

    root = Path(runtime.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "runtime.py"
                 and any(s in p.read_text() for s in ("torch.autocast(", "allow_tf32 =", "fp32_precision ="))]
    assert offenders == []
