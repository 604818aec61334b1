"""Tiny models of each family the equivalence matrix covers, built from configs (no hub access)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def _configs():
    t = transformers
    small = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": (
            t.LlamaForCausalLM,
            t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **small),
        ),
        "qwen2": (
            t.Qwen2ForCausalLM,
            t.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, **small),
        ),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)),
        "opt": (
            t.OPTForCausalLM,
            t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, **small),
        ),
        "bert": (
            t.BertModel,
            t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **small),
        ),
        "t5": (
            t.T5ForConditionalGeneration,
            t.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                       vocab_size=VOCAB, decoder_start_token_id=0),
        ),
        "gemma": (
            t.GemmaForCausalLM,
            t.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=8, **small),
        ),
    }  # fmt: skip


KINDS = tuple(_configs())


def model_class(kind: str):
    return _configs()[kind][0]


def build_checkpoint(kind: str, folder: str, dtype: torch.dtype = torch.float32, sharded: bool = False, *,
                     safetensors: bool = True) -> str:  # fmt: skip
    """Builds a randomly initialized tiny model of ``kind`` and saves it in ``dtype`` to ``folder``."""
    cls, config = _configs()[kind]
    torch.manual_seed(0)
    model = cls(config).to(dtype)
    kwargs = {"max_shard_size": "40KB"} if sharded else {}
    if safetensors:
        model.save_pretrained(folder, **kwargs)
    else:  # transformers 5 always writes safetensors: write the legacy pickle file ourselves
        import os

        model.config.architectures = [cls.__name__]
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return folder


def input_device(model) -> torch.device:
    """Where the model's inputs go: its input embeddings' device (with a one-device ``device_map`` accelerate adds no
    hook that would move them; with several devices its hooks move them from there)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def example_inputs(model) -> dict:
    ids = (torch.arange(1, 9) % (VOCAB - 1) + 1).unsqueeze(0).to(input_device(model))
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs
