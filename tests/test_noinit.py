"""skip_init, disable_torch_init and restore_torch_init: scoped, restored, thread-safe, nestable."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import hf_fastload
from hf_fastload.integration import noinit


def _consumes_rng(build) -> bool:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    build()
    return not torch.equal(before, torch.get_rng_state())


def test_skip_init_skips_and_restores():
    reset, kaiming = nn.Linear.__dict__["reset_parameters"], nn.init.kaiming_uniform_
    assert _consumes_rng(lambda: nn.Linear(64, 64))
    with hf_fastload.skip_init():
        assert noinit.init_skipped()
        assert not _consumes_rng(lambda: nn.Linear(64, 64))
        assert not _consumes_rng(lambda: nn.Embedding(100, 16))
        assert not _consumes_rng(lambda: nn.Conv2d(3, 8, 3))
        t = torch.full((4,), 7.0)
        nn.init.normal_(t)
        assert torch.equal(t, torch.full((4,), 7.0))
    assert not noinit.init_skipped()
    assert nn.Linear.__dict__["reset_parameters"] is reset and nn.init.kaiming_uniform_ is kaiming
    assert _consumes_rng(lambda: nn.Linear(64, 64))


def test_restored_on_exception():
    reset = nn.Linear.__dict__["reset_parameters"]
    with pytest.raises(KeyError):
        with hf_fastload.skip_init():
            raise KeyError("boom")
    assert nn.Linear.__dict__["reset_parameters"] is reset
    assert not noinit.init_skipped()


def test_nests():
    with hf_fastload.skip_init():
        with hf_fastload.skip_init():
            assert noinit.init_skipped()
        assert noinit.init_skipped()
        assert not _consumes_rng(lambda: nn.Linear(8, 8))
    assert not noinit.init_skipped()


def test_other_threads_keep_normal_init():
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait()
        seen["skipped"] = noinit.init_skipped()
        seen["rng"] = _consumes_rng(lambda: nn.Linear(16, 16))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with hf_fastload.skip_init():
        inside.set()
        done.wait(10)
    thread.join()
    assert seen == {"skipped": False, "rng": True}


def test_disable_and_restore_torch_init():
    reset = nn.Linear.__dict__["reset_parameters"]
    hf_fastload.disable_torch_init()
    try:
        hf_fastload.disable_torch_init()  # idempotent
        assert noinit.init_skipped()
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("skipped", noinit.init_skipped()))
        thread.start()
        thread.join()
        assert result["skipped"], "the global switch applies to every thread, as LLaVA's does"
        assert not _consumes_rng(lambda: nn.LayerNorm(8))
    finally:
        hf_fastload.restore_torch_init()
    hf_fastload.restore_torch_init()  # idempotent
    assert nn.Linear.__dict__["reset_parameters"] is reset
    assert _consumes_rng(lambda: nn.Linear(8, 8))


def test_fast_load_leaves_init_alone(checkpoints):
    path = checkpoints("llama", torch.float32)
    hf_fastload.fast_from_pretrained(path)
    assert _consumes_rng(lambda: nn.Linear(8, 8))
