"""Shared fixtures: tiny real models saved with save_pretrained, and a guard that no test leaves a patch behind."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("HF_FASTLOAD_CACHE", None)  # tests that use the converted-tensor cache say so

import pytest  # noqa: E402
import torch  # noqa: E402
from models import build_checkpoint  # noqa: E402


def pytest_report_header(config) -> str:
    """Whether this run sees peft: transformers' Auto classes pass other arguments to every load when it does."""
    import importlib.metadata
    import importlib.util
    import sys

    try:
        installed = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return "peft: not installed (pip install -e '.[test]' installs it)"
    if "peft" in sys.modules and sys.modules["peft"] is None:
        return f"peft: {installed} installed, hidden from this run (tests/nopeft on PYTHONPATH)"
    return f"peft: {installed}" if importlib.util.find_spec("peft") else f"peft: {installed} installed, not importable"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(kind, dtype, sharded) -> folder, built once per session."""
    cache: dict[tuple, str] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def get(kind: str, dtype: torch.dtype = torch.float32, sharded: bool = False, **options) -> str:
        key = (kind, dtype, sharded, tuple(sorted(options.items())))
        if key not in cache:
            folder = root / f"{kind}-{str(dtype).split('.')[-1]}-{'sharded' if sharded else 'single'}-{len(cache)}"
            cache[key] = build_checkpoint(kind, str(folder), dtype, sharded, **options)
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def no_patch_left_behind():
    """Fails a test that leaves hf_fastload's patches installed, or autograd switched off."""
    import torch.nn as nn
    import transformers
    from transformers.generation.utils import GenerationMixin

    from hf_fastload.features import optin
    from hf_fastload.integration import compat, noinit, routing

    linear_reset = nn.Linear.__dict__["reset_parameters"]
    normal = nn.init.normal_
    # inference_mode wraps instances only; fast_pipeline wraps a pipeline's model, never the classes or pipeline()
    module_call, generate, pipeline = nn.Module.__call__, GenerationMixin.__dict__["generate"], transformers.pipeline
    yield
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled(), "grad mode left switched off"
    assert nn.Module.__call__ is module_call and GenerationMixin.__dict__["generate"] is generate
    assert transformers.pipeline is pipeline
    assert compat.PATCHES.users == 0 and not compat.PATCHES.saved, "transformers hooks left installed"
    assert noinit.PATCHES.users == 0 and not noinit._global, "init patches left installed"
    assert nn.Linear.__dict__["reset_parameters"] is linear_reset
    assert nn.init.normal_ is normal
    assert routing.PATCHES.users == 0 and not routing.PATCHES.saved and not routing._global, (
        "from_pretrained routing left installed"
    )
    assert not optin.is_enabled() and not optin._switch and optin._blocks == 0, "hf_fastload.enable() left on"
