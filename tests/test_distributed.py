"""Tensor-parallel loads: slices read only their bytes and equal safetensors'; under ``torchrun`` (2 CPU ranks, gloo)
the fast load equals stock's tensor-parallel load bit for bit, and each rank reads less than the checkpoint."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import transformers

import hf_fastload
from hf_fastload import FallbackRequiredError
from hf_fastload.engine.context import LoadContext
from hf_fastload.engine.slices import parse_index
from hf_fastload.integration import compat
from hf_fastload.integration.distributed import tp_fallback_reason

HERE = os.path.dirname(os.path.abspath(__file__))
TORCHRUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tensors_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {
        "rows": torch.randn(37, 53).to(torch.bfloat16),
        "cube": torch.randn(4, 9, 70),
        "long_rows": torch.randn(64, 40000),  # 160 KB rows: half-row runs (>= 64 KiB) are read with their own pread
        "experts": torch.randn(3, 500, 30),
        "vector": torch.randn(11),
        "empty": torch.zeros(0, 5),
    }
    path = str(tmp_path_factory.mktemp("slices") / "t.safetensors")
    save_file(tensors, path)
    return path, tensors


def _random_slice(rng: random.Random, size: int) -> slice:
    a, b = rng.randint(-size - 2, size + 2), rng.randint(-size - 2, size + 2)
    return slice(rng.choice([None, a]), rng.choice([None, b]))


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_slices_equal_safetensors(tensors_file, io):
    from safetensors import safe_open

    path, tensors = tensors_file
    rng = random.Random(1)
    ctx = LoadContext(io=io)
    ctx.readahead = False
    mine = ctx.open(path)
    try:
        with safe_open(path, "pt") as ref:
            for name, t in tensors.items():
                for _ in range(60 if name != "long_rows" else 8):
                    key = tuple(_random_slice(rng, n) for n in t.shape[: rng.randint(1, max(1, t.ndim))])
                    if rng.random() < 0.3:
                        key += (Ellipsis,)
                    expected, got = ref.get_slice(name)[key], mine.get_slice(name)[key]
                    assert (expected.shape, expected.dtype) == (got.shape, got.dtype), (name, key)
                    assert torch.equal(expected, got), (name, key)
    finally:
        ctx.close()


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_slices_count_only_their_bytes(tensors_file, io):
    path, tensors = tensors_file
    itemsize = 4  # long_rows is float32
    cases = [
        ((slice(10, 30),), 20 * 40000 * itemsize),  # a row block: one contiguous range
        ((slice(None), slice(20000, None)), 64 * 20000 * itemsize),  # long column runs: one pread each
    ]
    for key, expected in cases:
        ctx = LoadContext(io=io)
        ctx.readahead = False
        try:
            part = ctx.open(path).get_slice("long_rows")[key]
            assert torch.equal(part, tensors["long_rows"][key])
            assert ctx.bytes_read == expected and ctx.tensors == 1, (key, ctx.methods)
            assert all(m.startswith("slice:") for m in ctx.methods)
        finally:
            ctx.close()
    # short column runs: mmap copies just them; pread reads the rows' span and cuts it (less than the tensor)
    ctx = LoadContext(io=io)
    ctx.readahead = False
    try:
        part = ctx.open(path).get_slice("cube")[:, 2:5, 10:20]
        assert torch.equal(part, tensors["cube"][:, 2:5, 10:20])
        full = tensors["cube"].numel() * 4
        assert 4 * 3 * 10 * 4 <= ctx.bytes_read < full
    finally:
        ctx.close()


def test_other_indexes_take_the_whole_tensor(tensors_file):
    path, tensors = tensors_file
    ctx = LoadContext(io="pread")
    ctx.readahead = False
    try:
        handle = ctx.open(path)
        for key in [(0,), (slice(None, None, 2),), ([1, 3], Ellipsis), (Ellipsis, 1)]:
            assert parse_index(key, tuple(tensors["cube"].shape)) is None
            assert torch.equal(handle.get_slice("cube")[key], tensors["cube"][key]), key
        for key in [slice(None), (Ellipsis,), (slice(None), Ellipsis), (slice(-100, 100),)]:
            assert torch.equal(handle.get_slice("rows")[key], tensors["rows"][key]), key
    finally:
        ctx.close()


def test_parse_index():
    assert parse_index((slice(2, 5),), (10, 4)) == [(2, 5), (0, 4)]
    assert parse_index((Ellipsis, slice(-2, None)), (10, 4)) == [(0, 10), (2, 4)]
    assert parse_index(slice(7, 3), (10,)) == [(7, 7)]
    assert parse_index((slice(None),) * 3, (10, 4)) is None
    assert parse_index((Ellipsis, Ellipsis), (10, 4)) is None


def test_distributed_fallback_reasons():
    assert tp_fallback_reason({}) is None
    assert tp_fallback_reason({"tp_plan": "auto"}) is None
    assert tp_fallback_reason({"tp_plan": "auto", "tp_size": 2}) is None
    assert "device_mesh" in tp_fallback_reason({"device_mesh": object()})
    if compat.TRANSFORMERS_V5:
        assert tp_fallback_reason({"tp_plan": "auto", "device_mesh": object()}) is None
        assert tp_fallback_reason({"distributed_config": {"tp_size": 2}}) is None
        assert "fsdp_size" in tp_fallback_reason({"distributed_config": {"tp_size": 2, "fsdp_size": 2}})
        assert "pp_size" in tp_fallback_reason({"distributed_config": {"pp_size": 2}})
        assert "ep_size" in tp_fallback_reason({"distributed_config": {"ep_size": 2}})
    else:
        assert "4.57" in tp_fallback_reason({"tp_plan": "auto", "device_mesh": object()})
        assert "expert" in tp_fallback_reason({"distributed_config": {"enable_expert_parallel": True}})


def test_unverified_layouts_fall_back_with_reason(checkpoints):
    path = checkpoints("llama", torch.float32)
    with pytest.raises(FallbackRequiredError, match="device_mesh without tp_plan"):
        hf_fastload.fast_from_pretrained(path, strict=True, device_mesh=object())


def test_single_process_report_fields(checkpoints):
    path = checkpoints("llama", torch.float32)
    hf_fastload.fast_from_pretrained(path)
    report = hf_fastload.last_report()
    d = report.to_dict()
    json.dumps(d)
    assert (d["rank"], d["world_size"]) == (0, 1)
    assert d["checkpoint_bytes"] == d["bytes_read"] > 0 and d["read_share"] == 1.0
    assert "rank 0 of" not in str(report)


def _tiny(kind: str, folder: str) -> str:
    t = transformers
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)  # fmt: skip
    if kind == "llama":
        cls, config = t.LlamaForCausalLM, t.LlamaConfig(**common)
    else:
        # tied embeddings: lm_head is missing from the checkpoint and tied on load, to DTensors
        config = t.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True, **common)
        cls = t.MixtralForCausalLM
    torch.manual_seed(0)
    cls(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_matches_stock(tmp_path):
    """Llama and Mixtral, stock vs fast, 2 ranks: see tests/dist_worker.py for what is compared."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    specs = [f"{kind}={_tiny(kind, str(tmp_path / kind))}" for kind in ("llama", "mixtral")]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HF_FASTLOAD_IO"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), os.path.join(HERE, "dist_worker.py"), str(out), *specs,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and both ranks: our own session
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S}s:\n{log.decode(errors='replace')[-4000:]}")
    results = {}
    for rank in (0, 1):
        file = out / f"rank{rank}.json"
        assert file.exists(), f"rank {rank} wrote no result; torchrun said:\n{log.decode(errors='replace')[-4000:]}"
        results[rank] = json.loads(file.read_text())
    for rank, result in results.items():
        assert result["ok"], f"rank {rank}:\n{result['error']}"
    assert proc.returncode == 0, log.decode(errors="replace")[-4000:]
    for rank, result in results.items():
        models = {load["model"] for load in result["loads"]}
        assert models == {"llama", "mixtral"} and len(result["loads"]) >= 10
        for load in result["loads"]:
            report = load["report"]
            where = f"rank {rank} {load['model']} [{load['case']}]"
            assert report["path"] == "fast", where
            assert (report["rank"], report["world_size"]) == (rank, 2), where
            assert 0 < report["bytes_read"] < report["checkpoint_bytes"], where
            assert any(m.startswith("slice:") for m in report["methods"]), where


def test_report_of_a_rank():
    report = hf_fastload.LoadReport(source="m", rank=1, world_size=2, bytes_read=300, checkpoint_bytes=1000)
    d = report.to_dict()
    assert json.loads(json.dumps(d))["read_share"] == 0.3 and (d["rank"], d["world_size"]) == (1, 2)
    assert "rank 1 of 2: read" in str(report) and "(30.0%)" in str(report)
