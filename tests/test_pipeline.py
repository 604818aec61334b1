"""fast_pipeline gives stock pipeline outputs, loads through the fast path, records no autograd graph;
inference_mode / training_mode wrap and unwrap a model without changing what it computes.

Every model and tokenizer here is built in the test: a WordPiece tokenizer trained with `tokenizers` on a few
sentences (milliseconds) and a tiny model whose vocabulary is exactly the tokenizer's.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

import hf_fastload
from hf_fastload.features.pipeline import _direct_placement
from hf_fastload.integration import inference

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "paris is the capital of france and berlin is the capital of germany",
    "hugging face transformers load models from safetensors files",
    "a tiny model with a tiny vocabulary answers tiny questions",
    "my name is sarah and i live in london",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TASK_REMOVED = "transformers 5 removed this pipeline task"


def make_tokenizer(folder: str, template: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Trains a WordPiece tokenizer on CORPUS and saves it into ``folder``; BERT-style [CLS] x [SEP] if template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=SPECIALS))
    if template:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]", cls_token="[CLS]",
        sep_token="[SEP]", eos_token="[SEP]", model_max_length=64,
    )  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def _bert(cls, vocab: int, **extra):
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, **extra,
    )  # fmt: skip
    return cls(config)


def _llama(vocab: int, tok):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _t5(vocab: int, tok):
    config = transformers.T5Config(
        vocab_size=vocab, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


# task -> (builder of the saved model, whether the tokenizer adds [CLS]/[SEP], call arguments)
T = transformers
TASKS = {
    "text-generation": (_llama, False, (["the quick brown fox"],), {"max_new_tokens": 6, "do_sample": False}),
    "text2text-generation": (_t5, True, (["paris is the capital of"],), {"max_new_tokens": 6}),
    "fill-mask": (lambda v, t: _bert(T.BertForMaskedLM, v), True, (["paris is the [MASK] of france"],), {}),
    "feature-extraction": (lambda v, t: _bert(T.BertModel, v), True, (["a tiny model"],), {}),
    # a body-only checkpoint: the classifier head is missing and initialized randomly (seeded the same for both)
    "text-classification": (
        lambda v, t: _bert(T.BertModel, v, num_labels=3), True, (["the lazy dog", "tiny questions"],), {"top_k": None},
    ),
    "token-classification": (
        lambda v, t: _bert(T.BertForTokenClassification, v, num_labels=5), True, (["my name is sarah"],), {},
    ),
    "question-answering": (
        lambda v, t: _bert(T.BertForQuestionAnswering, v), True, (),
        {"question": "what is the capital of france", "context": "paris is the capital of france"},
    ),
}  # fmt: skip


def _supported(task: str) -> bool:
    from transformers.pipelines import SUPPORTED_TASKS

    return task in SUPPORTED_TASKS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """folders(task) -> a folder with a tiny model and its tokenizer, built once per module."""
    cache: dict[str, str] = {}

    def get(task: str) -> str:
        if task not in cache:
            build, template, _, _ = TASKS[task]
            folder = str(tmp_path_factory.mktemp(task))
            tok = make_tokenizer(folder, template)
            torch.manual_seed(0)
            build(len(tok), tok).save_pretrained(folder)
            cache[task] = folder
        return cache[task]

    return get


def _first_linear(model) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear))


def _run(pipe, task):
    _, _, args, kwargs = TASKS[task]
    torch.manual_seed(1)
    return pipe(*args, **kwargs)


@pytest.mark.parametrize("task", list(TASKS))
def test_pipeline_matches_stock(folders, task):
    if not _supported(task):
        pytest.skip(f"{task}: {TASK_REMOVED}")
    folder = folders(task)
    torch.manual_seed(0)  # heads missing from the checkpoint are initialized from the RNG
    stock = transformers.pipeline(task, model=folder)
    torch.manual_seed(0)
    fast = hf_fastload.fast_pipeline(task, model=folder)
    report = hf_fastload.last_report()
    assert report.path == "fast", report.reason
    assert report.source == folder
    assert type(fast) is type(stock) and type(fast.model) is type(stock.model)

    seen = []

    def hook(module, args, output):
        seen.append((output.requires_grad, torch.is_inference_mode_enabled()))

    handle = _first_linear(fast.model).register_forward_hook(hook)
    try:
        out_fast = _run(fast, task)
    finally:
        handle.remove()
    out_stock = _run(stock, task)
    assert out_fast == out_stock
    assert seen, "the hook did not run"
    assert all(not requires_grad for requires_grad, _ in seen), "an autograd graph was recorded"
    assert all(in_inference for _, in_inference in seen), "the pipeline forward did not run under inference_mode"
    assert inference.is_inference_mode(fast.model)
    assert not any(p.requires_grad for p in fast.model.parameters())


def test_inference_false_is_stock_behaviour(folders):
    folder = folders("fill-mask")
    pipe = hf_fastload.fast_pipeline("fill-mask", model=folder, inference=False)
    assert hf_fastload.last_report().path == "fast"
    assert not inference.is_inference_mode(pipe.model)
    assert "get_inference_context" not in vars(pipe)
    assert all(p.requires_grad for p in pipe.model.parameters())
    assert _run(pipe, "fill-mask") == _run(transformers.pipeline("fill-mask", model=folder), "fill-mask")


def test_built_model_is_used_as_is(folders):
    folder = folders("fill-mask")
    model = transformers.BertForMaskedLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    pipe = hf_fastload.fast_pipeline("fill-mask", model=model, tokenizer=tok)
    assert pipe.model is model
    assert not inference.is_inference_mode(model), "a caller's model keeps its requires_grad flags"
    assert all(p.requires_grad for p in model.parameters())
    assert pipe.get_inference_context() is torch.inference_mode
    assert _run(pipe, "fill-mask") == _run(transformers.pipeline("fill-mask", model=folder), "fill-mask")


def test_device_map_passes_through(folders):
    """The path an accelerator device takes (device_map={"": device}), exercised with the CPU."""
    folder = folders("feature-extraction")
    pipe = hf_fastload.fast_pipeline("feature-extraction", model=folder, device_map={"": "cpu"})
    assert hf_fastload.last_report().path == "fast"
    assert pipe.device == torch.device("cpu")
    assert _run(pipe, "feature-extraction") == _run(
        transformers.pipeline("feature-extraction", model=folder), "feature-extraction"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"model": "m", "device": "cuda:0"}, {"model": "m", "device": None, "device_map": {"": "cuda:0"}}),
        ({"model": "m", "device": 1}, {"model": "m", "device": None, "device_map": {"": 1}}),
        ({"model": "m", "device": "cpu"}, {"model": "m", "device": "cpu"}),
        ({"model": "m", "device": -1}, {"model": "m", "device": -1}),
        ({"model": "m", "device": torch.device("cpu")}, {"model": "m", "device": torch.device("cpu")}),
        ({"model": "m"}, {"model": "m"}),
        ({"model": "m", "device": 0, "device_map": "auto"}, {"model": "m", "device": 0, "device_map": "auto"}),
        (
            {"model": "m", "device": 0, "model_kwargs": {"device_map": "auto"}},
            {"model": "m", "device": 0, "model_kwargs": {"device_map": "auto"}},
        ),
    ],
)
def test_accelerator_device_becomes_device_map(given, expected):
    arguments = dict(given)
    _direct_placement(arguments)
    assert arguments == expected


def test_built_model_device_unchanged():
    arguments = {"model": torch.nn.Linear(2, 2), "device": "cuda:0"}
    _direct_placement(arguments)
    assert arguments == {"model": arguments["model"], "device": "cuda:0"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipeline_on_cuda_loads_straight_onto_device(folders):
    folder = folders("fill-mask")
    pipe = hf_fastload.fast_pipeline("fill-mask", model=folder, device=0)
    assert pipe.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.model.parameters())
    assert hf_fastload.last_report().path == "fast"


def test_signature_and_docstring():
    stock = inspect.signature(transformers.pipeline)
    ours = inspect.signature(hf_fastload.fast_pipeline)
    params = dict(ours.parameters)
    assert params.pop("inference").default is True
    assert params.pop("fastload_cache").default is None
    assert list(params) == list(stock.parameters)
    assert all(params[k].default == p.default for k, p in stock.parameters.items())
    assert ours.return_annotation == stock.return_annotation
    assert transformers.pipeline.__doc__ in hf_fastload.fast_pipeline.__doc__
    assert hf_fastload.fast_pipeline.__name__ == "fast_pipeline"


# inference_mode / training_mode on a model

_METHODS = ("forward", "generate")


@pytest.fixture(scope="module")
def llama_folder(folders):
    return folders("text-generation")


def _ids(model):
    return (torch.arange(3, 11) % (model.config.vocab_size - 1) + 1).unsqueeze(0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_wrapped_logits_are_bitwise_equal(llama_folder):
    plain = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    wrapped = hf_fastload.fast_from_pretrained(llama_folder, inference=True)
    assert inference.is_inference_mode(wrapped) and not inference.is_inference_mode(plain)
    ids = _ids(plain)
    expected = plain(ids).logits  # with autograd
    assert expected.requires_grad
    got = wrapped(ids).logits
    assert not got.requires_grad
    assert torch.equal(_bits(expected), _bits(got))


def test_fast_from_pretrained_inference_flag(llama_folder):
    model = hf_fastload.fast_from_pretrained(llama_folder, inference=True)
    assert "forward" in vars(model) and "generate" in vars(model)
    assert not any(p.requires_grad for p in model.parameters())
    model, info = hf_fastload.fast_from_pretrained(llama_folder, inference=True, output_loading_info=True)
    assert inference.is_inference_mode(model) and isinstance(info, dict)
    assert not inference.is_inference_mode(hf_fastload.fast_from_pretrained(llama_folder))


def test_fallback_load_is_wrapped_too(checkpoints):
    folder = checkpoints("llama", safetensors=False)
    model = hf_fastload.fast_from_pretrained(folder, inference=True, use_safetensors=False)
    assert hf_fastload.last_report().path == "fallback"
    assert inference.is_inference_mode(model)


def test_training_mode_restores_autograd(llama_folder):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen layer stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    forward_before = model.forward
    hf_fastload.inference_mode(model)
    hf_fastload.inference_mode(model)  # idempotent
    ids = _ids(model)
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(ids, labels=ids).loss.backward()
    assert hf_fastload.training_mode(model) is model
    hf_fastload.training_mode(model)  # idempotent
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert model.forward == forward_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, inference._STATE)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.embed_tokens.weight"] is None
    assert all(g is not None for n, g in grads.items() if n != "model.embed_tokens.weight")


def test_wrapping_keeps_signature_and_name(llama_folder):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    before = {name: (inspect.signature(getattr(model, name)), getattr(model, name).__doc__) for name in _METHODS}
    hf_fastload.inference_mode(model)
    for name in _METHODS:
        method = getattr(model, name)
        assert (inspect.signature(method), method.__doc__) == before[name]
        assert method.__name__ == name
    other = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    assert "forward" not in vars(other), "only the instance is wrapped"


def test_deepcopy_of_wrapped_model_calls_its_own_weights(llama_folder):
    model = hf_fastload.inference_mode(transformers.LlamaForCausalLM.from_pretrained(llama_folder))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    ids = _ids(model)
    assert torch.count_nonzero(twin(ids).logits) == 0
    assert torch.count_nonzero(model(ids).logits) > 0
    hf_fastload.training_mode(twin)
    assert twin.lm_head.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_generate_matches_unwrapped(llama_folder):
    plain = transformers.LlamaForCausalLM.from_pretrained(llama_folder)
    wrapped = hf_fastload.fast_from_pretrained(llama_folder, inference=True)
    ids = _ids(plain)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    expected = plain.generate(ids, **kwargs)
    seen = []
    handle = _first_linear(wrapped).register_forward_hook(
        lambda m, a, out: seen.append((out.requires_grad, torch.is_inference_mode_enabled()))
    )
    got = wrapped.generate(ids, **kwargs)
    handle.remove()
    assert torch.equal(expected, got)
    assert got.is_inference()
    assert seen and all(not rg and inf for rg, inf in seen)


def test_static_cache_generate_after_training_mode(llama_folder):
    """4.57 keeps a static cache on the model between generate calls; made under inference_mode, it is dropped."""
    model = hf_fastload.fast_from_pretrained(llama_folder, inference=True)
    ids = _ids(model)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    kwargs["cache_implementation"] = "static"
    first = model.generate(ids, **kwargs)
    hf_fastload.training_mode(model)
    assert "_cache" not in vars(model)
    assert torch.equal(model.generate(ids, **kwargs), first)


def test_forward_outputs_are_ordinary_tensors(llama_folder):
    """Why forward runs under no_grad, not inference_mode: callers update logits in place and feed them to autograd.

    Under inference_mode both raise; the last part shows it, so a change of the wrapper is a deliberate one.
    """
    model = hf_fastload.fast_from_pretrained(llama_folder, inference=True)
    ids = _ids(model)
    logits = model(ids).logits
    assert not logits.is_inference()
    logits[:, -1] /= 0.7  # a hand-written sampling loop's temperature
    head = torch.nn.Linear(logits.shape[-1], 2)
    head(logits).sum().backward()  # a trainable head on frozen features
    assert head.weight.grad is not None

    with torch.inference_mode():
        inference_logits = type(model).forward(model, ids).logits
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        inference_logits[:, -1] /= 0.7
    with pytest.raises(RuntimeError, match="cannot be saved for backward"):
        head(inference_logits).sum().backward()


def test_model_without_generate():
    model = hf_fastload.inference_mode(torch.nn.Linear(3, 2))
    assert "forward" in vars(model) and "generate" not in vars(model)
    assert not model(torch.ones(1, 3)).requires_grad
    hf_fastload.training_mode(model)
    assert model(torch.ones(1, 3)).requires_grad
