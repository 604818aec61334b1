"""The checkpoint maker and the ``hf-fastload`` command (bench, in fresh worker processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_fastload.tools import bench, cli
from hf_fastload.tools.checkpoint_maker import llama_dims, make_checkpoint

TINY = 2e6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", params=TINY, shards=2)


@pytest.mark.parametrize("params", [2e6, 1.5e8, 1e9, 3e9])
def test_llama_dims_are_close_to_the_requested_count(params):
    assert abs(llama_dims(params).num_parameters() / params - 1) < 0.03


def test_llama_dims_of_8b_are_llama_3_8b():
    d = llama_dims(8e9)
    assert (d.hidden_size, d.intermediate_size, d.num_hidden_layers) == (4096, 14336, 32)
    assert (d.num_attention_heads, d.num_key_value_heads, d.vocab_size) == (32, 8, 128256)


@pytest.mark.parametrize("shards", [1, 2])
def test_make_checkpoint_loads_with_transformers(tmp_path, shards):
    import torch
    import transformers
    from safetensors.torch import load_file

    path = make_checkpoint(tmp_path / "ckpt", params=TINY, shards=shards, seed=1)
    names = sorted(os.listdir(path))
    if shards == 1:
        assert names == ["config.json", "model.safetensors"]
    else:
        assert names == [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
        with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as fh:
            index = json.load(fh)
        assert set(index) == {"metadata", "weight_map"}
        sizes = sum(os.path.getsize(os.path.join(path, f)) for f in set(index["weight_map"].values()))
        assert 0 < index["metadata"]["total_size"] < sizes

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.num_parameters() == llama_dims(TINY).num_parameters()
    assert model.config.tie_word_embeddings is False
    stored = {}
    for f in names:
        if f.endswith(".safetensors"):
            stored.update(load_file(os.path.join(path, f)))
    assert set(stored) == set(model.state_dict())
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert torch.equal(stored["model.norm.weight"], torch.ones_like(stored["model.norm.weight"]))
    weight = stored["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < weight.std().item() < 0.025
    assert torch.equal(model.lm_head.weight.to(torch.bfloat16), stored["lm_head.weight"])


def test_make_checkpoint_is_deterministic_and_replaces_old_shards(tmp_path):
    from safetensors.torch import load_file

    path = make_checkpoint(tmp_path / "ckpt", params=TINY, shards=2, seed=3)
    first = load_file(os.path.join(path, "model-00001-of-00002.safetensors"))
    make_checkpoint(path, params=TINY, shards=1, seed=3)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    again = load_file(os.path.join(path, "model.safetensors"))
    assert all(t.equal(again[name]) for name, t in first.items())


def test_importing_the_cli_is_cheap():
    code = "import sys, hf_fastload.tools.cli, hf_fastload.tools.bench_worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    assert out.stdout.strip() == "False"


def test_bench_writes_json_with_every_mode(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "hf_fastload.tools.cli", "bench", tiny_checkpoint, "--runs", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stock/fast" in proc.stdout

    result = json.loads(out.read_text())
    summary = result["summary"]
    for mode in ("stock", "fast", "floor"):
        assert summary[mode]["seconds_median"] > 0
        assert summary[mode]["peak_rss_over_preload_bytes_median"] >= 0
    assert summary["fast"]["paths"] == ["fast"]
    assert summary["stock_over_fast"] > 0 and summary["fast_over_floor"] > 0
    runs = {r["mode"]: r for r in result["runs"]}
    assert runs["fast"]["report"]["path"] == "fast"
    assert runs["fast"]["model_bytes"] == runs["stock"]["model_bytes"] > 0
    assert [r["mode"] for r in result["runs"]] == ["stock", "fast", "floor"]  # stock first in even runs
    assert result["checkpoint"]["tensor_bytes"] == runs["floor"]["bytes_read"]
    assert result["machine"]["cpu_count"] == os.cpu_count()
    assert bench.format_table(result).splitlines()[-1].lstrip().startswith("stock/fast")


def test_a_failing_worker_raises_with_its_stderr(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", params=TINY)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(bench.WorkerError, match="(?s)floor worker failed.*truncated safetensors file"):
        bench._run_worker("floor", path, ["--dtype", "auto"], _env())


def test_bench_of_a_folder_without_weights_exits_nonzero(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path), "--runs", "1"]) == 1
    assert "no safetensors files" in capsys.readouterr().err


def _fake_result() -> dict:
    summary = {
        mode: {"seconds_median": s, "seconds_min": s, "seconds_max": s, "peak_rss_over_preload_bytes_median": 2**20}
        for mode, s in (("stock", 2.0), ("fast", 1.0), ("floor", 0.5))
    }
    return {"summary": summary, "checkpoint": {"path": "/x/ckpt", "tensor_bytes": 10**9}, "args": {"dtype": "auto",
            "device": "cpu"}}  # fmt: skip


def test_plot_without_matplotlib_prints_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.write_plot(_fake_result(), str(tmp_path / "p.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.write_plot(_fake_result(), str(tmp_path / "p.png")) is True
    assert (tmp_path / "p.png").stat().st_size > 0
