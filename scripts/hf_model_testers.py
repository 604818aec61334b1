"""transformers' own model tests (``ModelTesterMixin``) on tiny models of six architectures.

Example:
    ```bash
    python scripts/hf_model_tests.py   # copies this file next to the sdist's tests/test_modeling_common.py, runs it
    ```

The model test folders (``tests/models/llama/...``) are not in transformers' source distribution, only the common
mixins; these testers stand in for them: a config, inputs, and the model classes to test, per architecture. They
are written for this project (tiny sizes, seeded), with transformers' tests as the model of what a tester provides.
"""

import random
import unittest

import torch
import transformers

from .test_modeling_common import ModelTesterMixin, ids_tensor

VOCAB = 99


class TinyTester:
    """What ``ModelTesterMixin`` asks of ``self.model_tester``: a config and a batch of inputs for it."""

    batch_size = 2
    seq_length = 7
    num_choices = 2
    vocab_size = VOCAB
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4

    def __init__(self, parent, make_config, encoder_decoder=False):
        self.parent, self.make_config, self.is_encoder_decoder = parent, make_config, encoder_decoder

    def get_config(self):
        return self.make_config()

    def _ids(self, config):
        """Token ids above the special ones (0-2), ending with one end-of-sequence token (T5's classifier needs it)."""
        ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        if getattr(config, "eos_token_id", None) is not None:
            ids[:, -1] = config.eos_token_id
        return ids

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = self._ids(config)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self.is_encoder_decoder:
            decoder_ids = self._ids(config)
            inputs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones_like(decoder_ids))
        return config, inputs


def _decoder_only(config_class, **extra):
    def make():
        return config_class(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )

    return make


def _classes(prefix, *heads):
    return tuple(getattr(transformers, prefix + head) for head in heads if hasattr(transformers, prefix + head))


# Per architecture the classes whose loads differ: the base model (checkpoint keys with or without the prefix), the
# language-model head (tied weights) and the sequence classifier (a head the checkpoint may lack or size otherwise).
_HEADS = ("Model", "ForCausalLM", "ForSequenceClassification")
ARCHITECTURES = {
    "llama": (_classes("Llama", *_HEADS), _decoder_only(transformers.LlamaConfig), False),
    "qwen2": (_classes("Qwen2", *_HEADS), _decoder_only(transformers.Qwen2Config), False),
    "mixtral": (
        _classes("Mixtral", *_HEADS),
        _decoder_only(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2),
        False,
    ),
    "gpt2": (
        _classes("GPT2", "Model", "LMHeadModel", "ForSequenceClassification"),
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        False,
    ),
    "bert": (
        _classes("Bert", "Model", "ForMaskedLM", "ForSequenceClassification"),
        lambda: transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            type_vocab_size=2,
        ),
        False,
    ),
    "t5": (
        _classes("T5", "Model", "ForConditionalGeneration", "ForSequenceClassification"),
        lambda: transformers.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        True,
    ),
}


def _test_case(name, classes, make_config, encoder_decoder):
    def setUp(self):  # noqa: N802 - unittest's name
        random.seed(0)  # ids_tensor draws from the random module: the same inputs with and without the opt-in
        torch.manual_seed(0)
        self.model_tester = TinyTester(self, make_config, encoder_decoder)

    attributes = {
        "all_model_classes": classes,
        "is_encoder_decoder": encoder_decoder,
        "test_pruning": all(hasattr(cls, "_prune_heads") for cls in classes),  # 4.57 only
        "setUp": setUp,
    }
    return type(f"{name.capitalize()}ModelTest", (ModelTesterMixin, unittest.TestCase), attributes)


for _name, (_classes_, _make, _encdec) in ARCHITECTURES.items():
    globals()[f"{_name.capitalize()}ModelTest"] = _test_case(_name, _classes_, _make, _encdec)
