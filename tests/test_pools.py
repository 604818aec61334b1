"""The engine's threads: conversions run on the calling thread alone, and nothing else changes."""

from __future__ import annotations

import threading

import pytest
import torch

from hf_fastload.engine import pools


def _omp_or_skip():
    omp = pools._openmp()
    if omp is None:
        pytest.skip("torch's operators do not run on OpenMP in this build")
    return omp


def test_one_op_thread_changes_only_this_thread_and_restores_it():
    get, _ = _omp_or_skip()
    process_wide = torch.get_num_threads()
    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def converting():
        torch.get_num_threads()
        seen["before"] = get()
        with pools.one_op_thread():
            seen["inside"] = get()
            x = torch.ones(1 << 20, dtype=torch.bfloat16)
            seen["equal"] = torch.equal(x.to(torch.float32), torch.ones(1 << 20))
            inside.set()
            done.wait(10)
        seen["after"] = get()

    def other():
        inside.wait(10)
        torch.get_num_threads()
        seen["other"] = get()
        done.set()

    threads = [threading.Thread(target=converting), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen["inside"] == 1 and seen["equal"]
    assert seen["after"] == seen["before"] == seen["other"]  # restored; another thread at the same time: untouched
    assert torch.get_num_threads() == process_wide and get() == process_wide  # this thread and the process: untouched


def test_one_op_thread_nests_and_restores_after_an_exception():
    get, _ = _omp_or_skip()
    torch.get_num_threads()
    before = get()
    with pytest.raises(KeyError):
        with pools.one_op_thread():
            with pools.one_op_thread():
                assert get() == 1
            assert get() == 1
            raise KeyError("x")
    assert get() == before


def test_one_op_thread_without_openmp_is_a_no_op(monkeypatch):
    monkeypatch.setattr(pools, "_omp", False)
    with pools.one_op_thread():
        assert torch.ones(3).sum().item() == 3
