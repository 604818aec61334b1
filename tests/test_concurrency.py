"""Several threads loading at once: with ``fast_from_pretrained`` and under ``hf_fastload.enable()``, different
models and the same one, good and broken checkpoints mixed. Every model equals stock, every thread's
``last_report()`` is its own, a broken load fails only its own thread, and nothing stays patched or open after.
(The three-model ``fast_from_pretrained`` case is ``test_fallback_and_report.test_concurrent_loads``.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading

import pytest
import torch
import transformers
from equivalence import assert_same_model

import hf_fastload
from hf_fastload import CheckpointFileError
from hf_fastload.integration import compat

CASES = [  # kind, stored dtype, sharded, model class, dtype asked for
    ("llama", torch.bfloat16, True, transformers.LlamaForCausalLM, torch.float32),
    ("opt", torch.float16, False, transformers.OPTForCausalLM, None),
    ("gpt2", torch.float32, False, transformers.GPT2LMHeadModel, torch.bfloat16),
    ("bert", torch.float32, True, transformers.BertModel, None),
]


def _run(jobs) -> tuple[dict, dict]:
    """Runs each job in its own thread, all released at once; (results, errors) by job index."""
    start = threading.Barrier(len(jobs))
    results, errors = {}, {}

    def work(i, job):
        start.wait()
        try:
            results[i] = job()
        except BaseException as e:  # noqa: BLE001
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a load never finished"
    return results, errors


def _kwargs(dtype):
    return {} if dtype is None else {"dtype": dtype}


@pytest.mark.parametrize("routed", [False, True], ids=["fast_from_pretrained", "enable"])
def test_different_models_at_once(checkpoints, routed):
    paths = [checkpoints(kind, stored, sharded) for kind, stored, sharded, _, _ in CASES]

    def job(i):
        _, _, _, cls, dtype = CASES[i]
        if routed:
            model = cls.from_pretrained(paths[i], **_kwargs(dtype))
        else:
            model = hf_fastload.fast_from_pretrained(paths[i], model_class=cls, **_kwargs(dtype))
        return model, hf_fastload.last_report(), compat.active_context()

    if routed:
        hf_fastload.enable()
    try:
        results, errors = _run([lambda i=i: job(i) for i in range(len(CASES))])
    finally:
        if routed:
            hf_fastload.disable()
    assert not errors, errors
    reports = [results[i][1] for i in range(len(CASES))]
    assert len({id(r) for r in reports}) == len(CASES), "threads shared a report"
    for i, (kind, _, _, cls, dtype) in enumerate(CASES):
        model, report, ctx = results[i]
        assert report.source == paths[i] and report.model_class == cls.__name__ and report.path == "fast", report
        assert report.tensors_loaded > 0 and ctx is None  # the thread's load context is gone once it returned
        assert_same_model(cls.from_pretrained(paths[i], **_kwargs(dtype)), model)
    assert hf_fastload.last_report() is None or hf_fastload.last_report() not in reports


@pytest.mark.parametrize("routed", [False, True], ids=["fast_from_pretrained", "enable"])
def test_same_model_in_many_threads(checkpoints, routed):
    path = checkpoints("llama", torch.float32, True)
    cls = transformers.LlamaForCausalLM

    def job():
        model = cls.from_pretrained(path) if routed else hf_fastload.fast_from_pretrained(path, model_class=cls)
        return model, hf_fastload.last_report()

    with hf_fastload.enabled() if routed else contextlib.nullcontext():
        results, errors = _run([job] * 4)
    assert not errors, errors
    stock = cls.from_pretrained(path)
    for model, report in results.values():
        assert report.path == "fast" and report.source == path
        assert_same_model(stock, model)
    models = [m for m, _ in results.values()]
    assert len({id(m) for m in models}) == 4
    # zero-copy tensors are private (copy-on-write) mappings: writing into one model changes no other
    with torch.no_grad():
        models[0].model.norm.weight.add_(1.0)
    assert torch.equal(models[1].model.norm.weight, stock.model.norm.weight)


def test_a_broken_load_fails_only_its_own_thread(checkpoints, tmp_path):
    good = [checkpoints("llama", torch.float32), checkpoints("gpt2", torch.float16)]
    broken = shutil.copytree(checkpoints("opt", torch.float32), tmp_path / "broken")
    weights = os.path.join(broken, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 256)
    classes = [transformers.LlamaForCausalLM, transformers.GPT2LMHeadModel]

    def load(i):
        model = hf_fastload.fast_from_pretrained(good[i], model_class=classes[i])
        return model, hf_fastload.last_report()

    def load_broken():
        try:
            hf_fastload.fast_from_pretrained(str(broken), model_class=transformers.OPTForCausalLM)
        finally:
            report = hf_fastload.last_report()
            assert report is not None and report.source == str(broken)

    results, errors = _run([lambda: load(0), load_broken, lambda: load(1)])
    assert set(errors) == {1} and isinstance(errors[1], CheckpointFileError), errors
    assert weights in str(errors[1])
    for i, slot in ((0, 0), (1, 2)):
        model, report = results[slot]
        assert report.path == "fast" and report.source == good[i]
        assert_same_model(classes[i].from_pretrained(good[i]), model)

