"""What inference wrapping saves: peak memory and time of an eval forward, and fast_pipeline vs pipeline end to end.

Example:
    ```bash
    python benchmarks/inference.py /tmp/llama-250m --make 0.25e9 --runs 3 --json benchmarks/results/inference.json
    python benchmarks/inference.py /tmp/llama-250m --runs 5 --tokens 512
    ```

Each measurement runs in a fresh Python process (this script with ``--worker``), the cases alternating run after run;
the table shows the median of ``--runs`` runs.

- ``forward``: the model loaded with ``hf_fastload.fast_from_pretrained(path, dtype=--dtype)`` (in eval mode, as
  ``from_pretrained`` returns it), one warm-up forward of 8 tokens, then the peak-RSS counter is reset (writing "5"
  to ``/proc/self/clear_refs``) and one forward of 1 x ``--tokens`` tokens is timed: ``plain`` as loaded (autograd
  records a graph, since the parameters require grad), ``inference_mode`` after ``hf_fastload.inference_mode(model)``.
  Memory is VmHWM after the forward minus RSS before it: the forward's own peak, activations and graph included.
- ``pipeline``: time to first output of a ``text-generation`` pipeline, from before ``transformers.pipeline(...)`` /
  ``hf_fastload.fast_pipeline(...)`` to the return of its first call (greedy, ``--new-tokens`` new tokens); imports
  happen before the clock starts. Both load with ``dtype=--dtype``.

``--make PARAMS`` first writes a synthetic bf16 Llama checkpoint of about PARAMS parameters into the folder (with
``hf_fastload.tools.checkpoint_maker``). A folder without a tokenizer gets a small WordPiece tokenizer trained on a few
sentences (its ids are far below the model's vocabulary size; ids it lacks decode to nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from hf_fastload.tools.bench_worker import reset_peak_rss as _reset_peak
from hf_fastload.tools.bench_worker import vm_bytes as _vm

FORWARD_CASES = ("forward-plain", "forward-inference_mode")
PIPELINE_CASES = ("pipeline-stock", "pipeline-fast")
PROMPT = "The quick brown fox jumps over the lazy dog and"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a synthetic llama checkpoint answers with random tokens",
    "hugging face transformers load models from safetensors files",
    "benchmarks measure time and memory on this machine",
]




def _forward(path: str, dtype: str, tokens: int, wrapped: bool) -> dict:
    import torch

    import hf_fastload

    model = hf_fastload.fast_from_pretrained(path, dtype=dtype)
    if wrapped:
        hf_fastload.inference_mode(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen)
    model(ids[:, :8])  # warm-up: first-call work (kernels, lazy buffers) is not what we measure
    rss0 = _vm("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    out = model(ids)
    seconds = time.perf_counter() - start
    peak = _vm("VmHWM") - rss0
    if out.logits.requires_grad == wrapped:
        raise RuntimeError(f"logits.requires_grad is {out.logits.requires_grad} with wrapped={wrapped}")
    return {"seconds": seconds, "peak_bytes": max(0, peak)}


def _pipeline(path: str, dtype: str, new_tokens: int, fast: bool) -> dict:
    import transformers

    import hf_fastload

    build = hf_fastload.fast_pipeline if fast else transformers.pipeline
    rss0 = _vm("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    pipe = build("text-generation", model=path, dtype=dtype)
    out = pipe(PROMPT, max_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_bytes": max(0, _vm("VmHWM") - rss0), "text": out[0]["generated_text"]}
    if fast:
        result["load_path"] = hf_fastload.last_report().path
    return result


def _worker(args) -> int:
    case = args.worker
    if case.startswith("forward-"):
        result = _forward(args.path, args.dtype, args.tokens, wrapped=case == "forward-inference_mode")
    else:
        result = _pipeline(args.path, args.dtype, args.new_tokens, fast=case == "pipeline-fast")
    print(json.dumps(result))
    return 0


def _make(path: str, params: float) -> None:
    try:
        from hf_fastload.tools.checkpoint_maker import make_checkpoint
    except ImportError:  # older trees: build a small Llama and save it
        import torch
        import transformers

        scale = max(1, round((params / 2.5e8) ** 0.5 * 4))
        config = transformers.LlamaConfig(
            hidden_size=192 * scale, intermediate_size=512 * scale, num_hidden_layers=8, num_attention_heads=scale * 3,
            num_key_value_heads=scale, vocab_size=32000,
        )  # fmt: skip
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        return
    make_checkpoint(path, params=params, dtype="bf16")


def _ensure_tokenizer(path: str) -> None:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if any(os.path.isfile(os.path.join(path, n)) for n in names):
        return
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend, which 4.57 lacks
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    print(f"wrote a {len(fast)}-token WordPiece tokenizer into {path}", flush=True)


def _run_case(case: str, args) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), args.path, "--worker", case, "--dtype", args.dtype,
        "--tokens", str(args.tokens), "--new-tokens", str(args.new_tokens),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(summary: dict, meta: dict) -> str:
    mib = 1 << 20
    lines = [
        f"# inference benchmark, {meta['date']}, {meta['machine']}",
        f"# {meta['path']} ({meta['parameters'] / 1e9:.3f}B parameters), dtype {meta['dtype']}, "
        f"forward 1 x {meta['tokens']} tokens, pipeline {meta['new_tokens']} new tokens; "
        f"median of {meta['runs']} runs",
        f"# torch {meta['torch']}, transformers {meta['transformers']}",
        "",
        f"| {'case':<46} | {'seconds':>8} | {'peak MiB':>9} |",
        f"|{'-' * 48}|{'-' * 10}|{'-' * 11}|",
    ]
    labels = {
        "forward-plain": "forward, as loaded (eval, autograd on)",
        "forward-inference_mode": "forward, hf_fastload.inference_mode(model)",
        "pipeline-stock": "text-generation, transformers.pipeline",
        "pipeline-fast": "text-generation, hf_fastload.fast_pipeline",
    }
    for case, row in summary.items():
        lines.append(f"| {labels[case]:<46} | {row['seconds']:>8.3f} | {row['peak_bytes'] / mib:>9.1f} |")
    if all(c in summary for c in FORWARD_CASES):
        a, b = (summary[c] for c in FORWARD_CASES)
        lines.append(
            f"\nforward: inference_mode takes {b['seconds'] / a['seconds']:.2f}x the time and "
            f"{b['peak_bytes'] / max(1, a['peak_bytes']):.2f}x the peak memory of the plain forward"
        )
    if all(c in summary for c in PIPELINE_CASES):
        a, b = (summary[c] for c in PIPELINE_CASES)
        lines.append(
            f"pipeline: fast_pipeline takes {b['seconds'] / a['seconds']:.2f}x the time to first output of "
            f"transformers.pipeline, and {b['peak_bytes'] / max(1, a['peak_bytes']):.2f}x its peak memory"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inference wrapping and fast_pipeline: time and peak memory.")
    parser.add_argument("path", help="a Llama checkpoint folder")
    parser.add_argument("--make", type=float, metavar="PARAMS", help="first write a bf16 checkpoint of ~PARAMS")
    parser.add_argument("--runs", type=int, default=3, help="runs per case (default 3); the median is shown")
    parser.add_argument("--dtype", default="float32", help="dtype to load and run in (default float32)")
    parser.add_argument("--tokens", type=int, default=256, help="forward sequence length (default 256)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens the pipeline generates (default 8)")
    parser.add_argument("--only", choices=("forward", "pipeline"), help="run one of the two benchmarks")
    parser.add_argument("--json", metavar="OUT", help="also write the runs and medians to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    if args.make:
        start = time.perf_counter()
        _make(args.path, args.make)
        print(f"wrote {args.path} in {time.perf_counter() - start:.1f}s", flush=True)
    cases = []
    if args.only in (None, "forward"):
        cases += FORWARD_CASES
    if args.only in (None, "pipeline"):
        _ensure_tokenizer(args.path)
        cases += PIPELINE_CASES

    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for k in range(args.runs):
        order = cases if k % 2 == 0 else list(reversed(cases))  # alternate, so neither side always goes first
        for case in order:
            runs[case].append(_run_case(case, args))
            print(f"run {k + 1}/{args.runs} {case}: {runs[case][-1]['seconds']:.3f}s", flush=True)
    summary = {
        case: {key: statistics.median(r[key] for r in rows) for key in ("seconds", "peak_bytes")}
        for case, rows in runs.items()
    }
    if all(c in runs for c in PIPELINE_CASES):
        texts = {c: {r["text"] for r in runs[c]} for c in PIPELINE_CASES}
        if texts["pipeline-stock"] != texts["pipeline-fast"]:
            print(f"WARNING: the pipelines generated different text: {texts}", file=sys.stderr)

    import torch
    import transformers

    with open(os.path.join(args.path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    dims = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores",
        "path": args.path,
        "parameters": _parameters(args.path),
        "config": {k: config.get(k) for k in dims},
        "dtype": args.dtype,
        "tokens": args.tokens,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print()
    print(_table(summary, meta))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "median": summary, "runs": runs}, fh, indent=2)
    return 0


def _parameters(path: str) -> int:
    """Parameter count from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as fh:
                for key in fh.keys():
                    total += _numel(fh.get_slice(key).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
