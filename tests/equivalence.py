"""What "bit-identical to from_pretrained" means, as one assertion."""

from __future__ import annotations

import torch
from models import example_inputs


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _tie_groups(model) -> set[frozenset[str]]:
    by_ptr: dict[tuple, set[str]] = {}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t.numel():
            by_ptr.setdefault((t.device, t.data_ptr(), t.shape), set()).add(name)
    return {frozenset(names) for names in by_ptr.values() if len(names) > 1}


def _logits(out):
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    return out[0]


def assert_same_model(stock, fast, stock_info=None, fast_info=None) -> None:
    assert type(stock) is type(fast)
    sd_s, sd_f = stock.state_dict(), fast.state_dict()
    assert list(sd_s) == list(sd_f), "state_dict keys differ"
    for key in sd_s:
        a, b = sd_s[key], sd_f[key]
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), key
        assert torch.equal(_bits(a), _bits(b)), f"{key}: values differ"
    params_s = dict(stock.named_parameters(remove_duplicate=False))
    params_f = dict(fast.named_parameters(remove_duplicate=False))
    assert list(params_s) == list(params_f)
    for key, p in params_s.items():
        q = params_f[key]
        assert (p.requires_grad, p.dtype, p.device) == (q.requires_grad, q.dtype, q.device), key
        assert torch.equal(_bits(p), _bits(q)), key
    bufs_s = dict(stock.named_buffers(remove_duplicate=False))
    bufs_f = dict(fast.named_buffers(remove_duplicate=False))
    assert list(bufs_s) == list(bufs_f), "buffers differ"
    for key, b in bufs_s.items():
        assert b.dtype == bufs_f[key].dtype and torch.equal(_bits(b), _bits(bufs_f[key])), key
    assert _tie_groups(stock) == _tie_groups(fast), "weight tying differs"
    assert [m.training for m in stock.modules()] == [m.training for m in fast.modules()]
    assert stock.dtype == fast.dtype
    with torch.no_grad():
        inputs = example_inputs(stock)
        ls, lf = _logits(stock(**inputs)), _logits(fast(**inputs))
    assert torch.equal(_bits(ls), _bits(lf)), "logits differ"
    if stock_info is not None:
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            assert sorted(map(str, stock_info.get(key) or [])) == sorted(map(str, fast_info.get(key) or [])), key
