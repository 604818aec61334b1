"""Synthetic Llama checkpoints for benchmarks and tests, written without building the model.

Example:
    ```python
    from hf_fastload.checkpoint_maker import llama_dims, make_checkpoint

    llama_dims(1e9)                     # LlamaDims(hidden_size=2048, ..., num_hidden_layers=20)
    path = make_checkpoint("./llama-1b", params=1e9, dtype="bf16", shards=2)
    ```

The folder holds what ``LlamaForCausalLM.save_pretrained`` would write for the weights: ``config.json``, and either
``model.safetensors`` or ``model-0000X-of-0000N.safetensors`` shards with a ``model.safetensors.index.json``. Tensor
names and shapes are those of ``LlamaForCausalLM.state_dict()``; weights are N(0, 0.02) (tiled from a seeded pool of
random values, which costs a memory copy instead of a random draw per element), norms are ones. Only one shard's
tensors are in memory at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

__all__ = ["DTYPE_NAMES", "LlamaDims", "llama_dims", "make_checkpoint"]

# Accepted spellings -> torch dtype attribute.
DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}  # fmt: skip
_POOL_ELEMENTS = 1 << 22
_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class LlamaDims:
    """The shape of a Llama model: what ``LlamaConfig`` needs to rebuild it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every tensor of ``LlamaForCausalLM.state_dict()``, in its order."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        shapes = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def config_kwargs(self) -> dict[str, int]:
        return asdict(self)


# (largest parameter count served, hidden, intermediate, heads, kv heads, vocab); layers are picked to fit.
_TIERS = (
    (4e6, 128, 352, 4, 2, 4096),
    (2e7, 256, 688, 4, 2, 8192),
    (6e7, 512, 1376, 8, 4, 16384),
    (3e8, 768, 2048, 12, 4, 32000),
    (6e8, 1024, 2816, 16, 4, 32000),
    (2.5e9, 2048, 5632, 32, 4, 32000),
    (6e9, 3072, 8192, 24, 8, 128256),
    (float("inf"), 4096, 14336, 32, 8, 128256),  # Llama-3-8B: 32 layers
)


def llama_dims(params: float) -> LlamaDims:
    """Llama dimensions whose parameter count is close to ``params`` (at least one layer, so tiny counts round up).

    Args:
        params (`float`): the wanted number of parameters, e.g. `1e9`. `8e9` gives Llama-3-8B's shapes.
    """
    if not params > 0:
        raise ValueError(f"params must be a positive number of parameters, e.g. 1e9; got {params!r}")
    for limit, hidden, inter, heads, kv, vocab in _TIERS:
        if params <= limit:
            break
    zero = LlamaDims(hidden, inter, 0, heads, kv, vocab)
    per_layer = LlamaDims(hidden, inter, 1, heads, kv, vocab).num_parameters() - zero.num_parameters()
    layers = max(1, round((params - zero.num_parameters()) / per_layer))
    return LlamaDims(hidden, inter, layers, heads, kv, vocab)


def _split(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shards: int) -> list[list]:
    """Consecutive groups of tensors of about equal bytes, one per shard, none empty."""
    n = len(shapes)
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be between 1 and the number of tensors ({n}); got {shards}")
    before = [0]  # bytes of the tensors before each index
    for _, shape in shapes:
        size = itemsize
        for d in shape:
            size *= d
        before.append(before[-1] + size)
    starts = [0]
    for g in range(1, shards):
        k = next(k for k in range(n + 1) if before[k] * shards >= g * before[-1])
        starts.append(min(max(k, starts[-1] + 1), n - (shards - g)))
    starts.append(n)
    return [shapes[a:b] for a, b in zip(starts, starts[1:])]


def _fill(tensor, pool, gen) -> None:
    """Fills ``tensor`` with slices of ``pool`` (a doubled run of random values) starting at random offsets."""
    import torch  # import cost: the CLI imports this module, and must not import torch

    flat = tensor.view(-1)
    for lo in range(0, flat.numel(), _POOL_ELEMENTS):
        n = min(_POOL_ELEMENTS, flat.numel() - lo)
        start = int(torch.randint(0, _POOL_ELEMENTS, (1,), generator=gen))
        flat[lo : lo + n].copy_(pool[start : start + n])


def make_checkpoint(
    out_dir: str | os.PathLike,
    params: float = 1e9,
    dtype: str = "bf16",
    shards: int = 1,
    seed: int = 0,
    dims: LlamaDims | None = None,
) -> str:
    """Writes a Llama-shaped ``LlamaForCausalLM`` checkpoint of about ``params`` parameters into ``out_dir``.

    Args:
        out_dir (`str` or `os.PathLike`): the folder; created if missing. Weight files and index already there are
            replaced.
        params (`float`, *optional*, defaults to `1e9`): the wanted parameter count (see :func:`llama_dims`).
        dtype (`str`, *optional*, defaults to `"bf16"`): `"bf16"`, `"fp16"` or `"fp32"` (or the torch names).
        shards (`int`, *optional*, defaults to `1`): the number of safetensors files; more than one adds an index.
        seed (`int`, *optional*, defaults to `0`): seeds the random weights.
        dims (`LlamaDims`, *optional*): exact dimensions, instead of those picked for `params`.

    Returns:
        `str`: the folder.
    """
    import torch  # import cost, as in _fill (the same for the three below)
    import transformers
    from packaging import version
    from safetensors.torch import save_file

    name = DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPE_NAMES))}; got {dtype!r}")
    torch_dtype = getattr(torch, name)
    dims = dims or llama_dims(params)
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):
        if stale == _INDEX_NAME or (stale.startswith("model") and stale.endswith(".safetensors")):
            os.remove(os.path.join(out, stale))

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_ELEMENTS, generator=gen).mul_(0.02).to(torch_dtype)
    pool = torch.cat([pool, pool])
    shapes = dims.tensor_shapes()
    groups = _split(shapes, torch_dtype.itemsize, shards)
    weight_map, total_size = {}, 0
    for k, group in enumerate(groups):
        filename = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for tensor_name, shape in group:
            t = torch.empty(shape, dtype=torch_dtype)
            if tensor_name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                _fill(t, pool, gen)
            tensors[tensor_name] = t
            weight_map[tensor_name] = filename
            total_size += t.numel() * t.element_size()
        save_file(tensors, os.path.join(out, filename), metadata={"format": "pt"})
        del tensors
    if shards > 1:
        index = {
            "metadata": {"total_parameters": dims.num_parameters(), "total_size": total_size},
            "weight_map": weight_map,
        }
        with open(os.path.join(out, _INDEX_NAME), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # `dtype` replaced `torch_dtype` in transformers 4.56.
    dtype_key = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    config = transformers.LlamaConfig(
        **dims.config_kwargs(),
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        **{dtype_key: name},
    )
    config.save_pretrained(out)  # last: a folder with a config.json is complete
    return out
