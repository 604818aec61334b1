"""One rank of the tensor-parallel equivalence check, run by tests/test_distributed.py under ``torchrun``.

Usage:
    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py OUT_DIR NAME=CKPT [NAME=CKPT ...]

For each checkpoint, loads it with stock ``from_pretrained(..., tp_plan="auto")`` and with
``hf_fastload.fast_from_pretrained`` (same arguments; mmap and pread I/O; float32 and the stored dtype), and compares
on this rank: state_dict keys, tensor types, DTensor meshes and placements, global and local shapes, strides, dtypes,
the local shards bit for bit, requires_grad, and the logits of one forward pass. Each rank writes
``OUT_DIR/rank<N>.json``: ``{"ok": bool, "error": str | None, "loads": [...]}`` with the fast loads' reports.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _bits(t):
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _layout(t) -> dict:
    """Everything about one tensor that must match stock, except its values."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        mesh = t.device_mesh
        local = t.to_local()
        return {
            "type": "DTensor",
            "placements": [repr(p) for p in t.placements],
            "mesh": mesh.mesh.tolist(),
            "mesh_dims": list(mesh.mesh_dim_names or ()),
            "mesh_device": mesh.device_type,
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "local_shape": list(local.shape),
            "local_stride": list(local.stride()),
            "dtype": str(t.dtype),
            "device": str(local.device),
        }
    return {
        "type": type(t).__name__,
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "dtype": str(t.dtype),
        "device": str(t.device),
    }


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def compare(stock, fast) -> int:
    """Raises AssertionError naming the first difference; returns the number of tensors compared."""
    import torch

    assert type(stock) is type(fast), (type(stock), type(fast))
    sd_s, sd_f = stock.state_dict(), fast.state_dict()
    assert list(sd_s) == list(sd_f), f"state_dict keys differ: {sorted(set(sd_s) ^ set(sd_f))[:5]}"
    for key in sd_s:
        a, b = sd_s[key], sd_f[key]
        assert _layout(a) == _layout(b), f"{key}: stock {_layout(a)} != fast {_layout(b)}"
        assert torch.equal(_bits(_local(a)), _bits(_local(b))), f"{key}: local shard values differ"
    params_s = dict(stock.named_parameters(remove_duplicate=False))
    params_f = dict(fast.named_parameters(remove_duplicate=False))
    assert list(params_s) == list(params_f), "parameter names differ"
    for key, p in params_s.items():
        q = params_f[key]
        assert (type(p), p.requires_grad) == (type(q), q.requires_grad), key
    bufs_s = dict(stock.named_buffers(remove_duplicate=False))
    bufs_f = dict(fast.named_buffers(remove_duplicate=False))
    assert list(bufs_s) == list(bufs_f), "buffers differ"
    for key, b in bufs_s.items():
        assert _layout(b) == _layout(bufs_f[key]) and torch.equal(_bits(_local(b)), _bits(_local(bufs_f[key]))), key
    assert stock.dtype == fast.dtype
    ids = (torch.arange(1, 9) % 90 + 1).unsqueeze(0)
    with torch.no_grad():
        ls, lf = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    assert torch.equal(_bits(_local(ls)), _bits(_local(lf))), "logits differ"
    return len(sd_s)


def cases(transformers) -> list[tuple[str, dict, dict]]:
    """(label, from_pretrained kwargs, environment for the fast load)."""
    import torch

    out = [
        ("tp_plan=auto float32 mmap", {"tp_plan": "auto", "dtype": torch.float32}, {"HF_FASTLOAD_IO": "mmap"}),
        ("tp_plan=auto float32 pread", {"tp_plan": "auto", "dtype": torch.float32}, {"HF_FASTLOAD_IO": "pread"}),
        ("tp_plan=auto bfloat16 mmap", {"tp_plan": "auto", "dtype": torch.bfloat16}, {"HF_FASTLOAD_IO": "mmap"}),
        ("tp_plan=auto bfloat16 pread", {"tp_plan": "auto", "dtype": torch.bfloat16}, {"HF_FASTLOAD_IO": "pread"}),
    ]
    if int(transformers.__version__.split(".")[0]) >= 5:
        from torch.distributed.device_mesh import init_device_mesh
        from transformers.distributed import DistributedConfig

        mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),), mesh_dim_names=("tp",))
        if "tp_size" in getattr(DistributedConfig, "__dataclass_fields__", {}):  # 5.0's has expert parallel only
            out.append(("distributed_config(tp_size=2)", {"distributed_config": DistributedConfig(tp_size=2)}, {}))
        out.append(("tp_plan=auto + device_mesh", {"tp_plan": "auto", "device_mesh": mesh}, {}))
    else:  # 4.57 with a device_mesh sets device_map to cpu:<local rank>, which fails on CPU: not tested here
        out.append(("tp_plan=auto tp_size=2", {"tp_plan": "auto", "tp_size": int(os.environ["WORLD_SIZE"])}, {}))
    return out


def main(argv: list[str]) -> int:
    out_dir, specs = argv[0], [a.split("=", 1) for a in argv[1:]]
    rank = int(os.environ["RANK"])
    result: dict = {"ok": False, "error": None, "loads": [], "rank": rank}
    try:
        import warnings

        import torch.distributed as dist
        import transformers

        import hf_fastload

        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        for name, path in specs:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                cls = getattr(transformers, json.load(fh)["architectures"][0])
            for label, kwargs, env in cases(transformers):
                stock = cls.from_pretrained(path, **kwargs)
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    fast = hf_fastload.fast_from_pretrained(path, model_class=cls, strict=True, **kwargs)
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                report = hf_fastload.last_report().to_dict()
                where = f"{name} [{label}]"
                try:
                    compared = compare(stock, fast)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from None
                result["loads"].append({"model": name, "case": label, "tensors": compared, "report": report})
                del stock, fast
                dist.barrier()
        result["ok"] = True
    except BaseException:  # noqa: BLE001  (reported to the test through the file)
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, default=str)
    if not result["ok"]:
        os._exit(1)  # do not wait in a collective for a rank that will never come
    try:
        import torch.distributed as dist

        dist.barrier()  # both ranks tear down together: gloo aborts a rank whose peer closed its pair first
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    # The loads were compared above and the result is written. The interpreter's own exit (C++ static destructors of
    # torch.distributed and gloo) once aborted a rank ("terminate called without an active exception", exit -6) on
    # a loaded CI VM after it had passed: that is torch's teardown, not a load, so the worker leaves without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
