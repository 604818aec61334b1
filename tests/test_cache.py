"""The converted-tensor cache (``fastload_cache=`` / ``HF_FASTLOAD_CACHE``): hits and misses, what is written, and
the faults: a source changed between loads, truncated or corrupt entries, writers racing in two processes, a full
disk, a read-only folder, a cache on another filesystem, eviction. Every load must equal stock; none may be stale.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from equivalence import assert_same_model

import hf_fastload
from hf_fastload.engine import cache as engine_cache
from hf_fastload.engine import context
from hf_fastload.engine.cache import wait_for_writes
from hf_fastload.engine.cache_store import CacheStore, source_key
from hf_fastload.errors import FastLoadError
from hf_fastload.format.file import SafetensorsFile
from hf_fastload.integration import caching
from hf_fastload.tools import cli

LLAMA = transformers.LlamaForCausalLM
HERE = os.path.dirname(os.path.abspath(__file__))


def _config(**extra) -> transformers.LlamaConfig:
    # hidden 64: most fp32 tensors are whole pages (placed in the entry while converting), the embedding (97 rows)
    # and the norms are not (written as the entry's tail)
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, **extra,
    )  # fmt: skip


def _save(folder, dtype=torch.bfloat16, seed=0, **kwargs) -> str:
    torch.manual_seed(seed)
    LLAMA(_config()).to(dtype).save_pretrained(folder, **kwargs)
    return str(folder)


@pytest.fixture
def ckpt(tmp_path) -> str:
    return _save(tmp_path / "ckpt")


def _fast(path, cache, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    model = hf_fastload.fast_from_pretrained(path, model_class=LLAMA, fastload_cache=str(cache), **kwargs)
    assert wait_for_writes(60)
    return model, hf_fastload.last_report()


def _stock(path, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return LLAMA.from_pretrained(path, **kwargs)


def _entries(cache) -> list[str]:
    folder = os.path.join(cache, "entries")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []


def _leftovers(cache) -> list[str]:
    folder = os.path.join(cache, "tmp")
    return os.listdir(folder) if os.path.isdir(folder) else []


def _sha(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


# -- hits, misses, the entry ----------------------------------------------------------------------------------------


def test_first_load_writes_second_maps(ckpt, tmp_path):
    cache = tmp_path / "cache"
    stock = _stock(ckpt)
    first, r1 = _fast(ckpt, cache)
    assert_same_model(stock, first)
    assert r1.cache["status"] == "miss" and r1.cache["written"] == r1.tensors_loaded > 0
    methods = r1.methods
    assert methods.get("convert+cache-write", 0) == r1.tensors_loaded, methods
    [entry] = _entries(cache)
    assert r1.cache["entries_written"] == [entry]
    assert _leftovers(cache) == []

    second, r2 = _fast(ckpt, cache)
    assert_same_model(stock, second)
    assert r2.cache["status"] == "hit" and r2.cache["hits"] == r2.tensors_loaded and r2.cache["written"] == 0
    assert r2.zero_copy == r2.tensors_loaded and r2.methods == {"zero-copy(cache)": r2.tensors_loaded}
    assert r2.cache["entries_used"] == [entry]
    assert "cache hit" in str(r2)


def test_entry_is_an_ordinary_safetensors_file(ckpt, tmp_path):
    cache = tmp_path / "cache"
    stock = _stock(ckpt)
    _fast(ckpt, cache)
    [entry] = _entries(cache)
    tensors = safetensors.torch.load_file(entry)
    state = stock.state_dict()
    assert set(tensors) <= set(state) and len(tensors) == hf_fastload.last_report().tensors_loaded
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and torch.equal(t, state[name]), name
    with safetensors.safe_open(entry, "pt") as f:
        meta = f.metadata()
    assert meta["hf_fastload_cache"] == "1"
    assert meta["source"] == os.path.realpath(os.path.join(ckpt, "model.safetensors"))
    with SafetensorsFile(entry) as f:
        for info in f.tensors.values():  # page-sized tensors start on a page, the rest on their element size
            align = 4096 if info.nbytes % 4096 == 0 else info.torch_dtype.itemsize
            assert info.start % align == 0, info


def test_writes_to_parameters_never_reach_the_entry(ckpt, tmp_path):
    cache = tmp_path / "cache"
    first, _ = _fast(ckpt, cache)  # the first load's tensors are views of the entry it wrote
    [entry] = _entries(cache)
    digest = _sha(entry)
    second, _ = _fast(ckpt, cache)
    with torch.no_grad():
        for model in (first, second):
            for p in model.parameters():
                p.add_(1.0)
    assert _sha(entry) == digest
    third, r3 = _fast(ckpt, cache)
    assert r3.cache["status"] == "hit"
    assert_same_model(_stock(ckpt), third)


def test_readahead_at_entry_reads_the_entries_not_the_checkpoint(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_FASTLOAD_READAHEAD", "entry")
    seen: list[str] = []
    monkeypatch.setattr(context.LoadContext, "read_ahead", lambda self, paths: seen.extend(paths))
    _fast(ckpt, cache)
    assert seen == [os.path.join(ckpt, "model.safetensors")]
    seen.clear()
    _, report = _fast(ckpt, cache)
    assert report.cache["status"] == "hit" and seen == _entries(cache)


def test_same_dtype_load_does_not_use_the_cache(ckpt, tmp_path):
    cache = tmp_path / "cache"
    _, report = _fast(ckpt, cache, dtype=torch.bfloat16)
    assert report.cache["status"] == "unused" and "nothing to cache" in report.cache["reason"]
    assert report.zero_copy == report.tensors_loaded and _entries(cache) == []


def test_each_dtype_gets_its_own_tensors(ckpt, tmp_path):
    cache = tmp_path / "cache"
    _fast(ckpt, cache, dtype=torch.float32)
    model, report = _fast(ckpt, cache, dtype=torch.float16)
    assert report.cache["status"] == "miss"
    assert_same_model(_stock(ckpt, dtype=torch.float16), model)
    assert len(_entries(cache)) == 2
    for dtype in (torch.float32, torch.float16):
        model, report = _fast(ckpt, cache, dtype=dtype)
        assert report.cache["status"] == "hit"
        assert_same_model(_stock(ckpt, dtype=dtype), model)


def test_sharded_tied_and_device_map_cpu(tmp_path):
    torch.manual_seed(0)
    config = _config(tie_word_embeddings=True)
    LLAMA(config).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    path, cache = str(tmp_path / "ckpt"), tmp_path / "cache"
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    stock = _stock(path, device_map="cpu")
    for status in ("miss", "hit"):
        model, report = _fast(path, cache, device_map="cpu")
        assert report.cache["status"] == status
        assert_same_model(stock, model)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(_entries(cache)) == len(report.files) > 1


def test_keyword_and_environment(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_FASTLOAD_CACHE", str(cache))
    hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.float32)
    assert wait_for_writes(60) and hf_fastload.last_report().cache["status"] == "miss"
    hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.float32, fastload_cache=False)
    assert hf_fastload.last_report().cache is None
    hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.float32, fastload_cache=True)
    assert hf_fastload.last_report().cache["status"] == "hit"  # True: HF_FASTLOAD_CACHE
    monkeypatch.delenv("HF_FASTLOAD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert caching.cache_dir({"fastload_cache": True}) == str(tmp_path / "xdg" / "hf_fastload" / "converted")
    kwargs = {"fastload_cache": None, "cache_dir": "hub"}
    assert caching.cache_dir(kwargs) is None and kwargs == {"cache_dir": "hub"}  # from_pretrained's own keyword


def test_opt_in_and_pipeline(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fast(ckpt, cache)
    monkeypatch.setenv("HF_FASTLOAD_CACHE", str(cache))
    with hf_fastload.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert hf_fastload.last_report().cache["status"] == "hit"
    assert_same_model(_stock(ckpt), model)
    monkeypatch.delenv("HF_FASTLOAD_CACHE")
    folder = tmp_path / "pipe"
    shutil.copytree(ckpt, folder)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(folder)
    for status in ("miss", "hit"):
        pipe = hf_fastload.fast_pipeline("text-generation", model=str(folder), dtype=torch.float32, inference=False,
                                         fastload_cache=str(tmp_path / "pcache"))  # fmt: skip
        assert wait_for_writes(60) and hf_fastload.last_report().cache["status"] == status
    assert_same_model(_stock(str(folder)), pipe.model)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t2")


def test_remote_source_read_with_pread_is_cached(ckpt, tmp_path, monkeypatch):
    """A same-dtype checkpoint on network storage (read with pread) is cached and then mapped locally."""
    monkeypatch.setattr(context, "_filesystem", lambda path: ("server:/export", "nfs"))
    cache = tmp_path / "cache"
    stock = _stock(ckpt, dtype=torch.bfloat16)
    first, r1 = _fast(ckpt, cache, dtype=torch.bfloat16)
    assert r1.io == "pread" and r1.cache["status"] == "miss" and r1.cache["written"] == r1.tensors_loaded
    second, r2 = _fast(ckpt, cache, dtype=torch.bfloat16)
    assert r2.cache["status"] == "hit" and r2.zero_copy == r2.tensors_loaded
    assert_same_model(stock, first)
    assert_same_model(stock, second)


def test_content_key_shares_entries_between_copies(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_CACHE_KEY", "content")
    cache = tmp_path / "cache"
    _fast(ckpt, cache)
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    model, report = _fast(str(copy), cache)
    assert report.cache["status"] == "hit" and report.cache["key"] == "content"
    assert_same_model(_stock(str(copy)), model)
    monkeypatch.setenv("HF_FASTLOAD_CACHE_KEY", "identity")
    assert _fast(str(copy), cache)[1].cache["status"] == "miss"  # another inode: another key


@pytest.mark.parametrize("name, value", [("HF_FASTLOAD_CACHE_MAX_GB", "lots"), ("HF_FASTLOAD_CACHE_MAX_GB", "0"),
                                         ("HF_FASTLOAD_CACHE_KEY", "mtime"),
                                         ("HF_FASTLOAD_CACHE_WRITE", "later")])  # fmt: skip
def test_bad_settings_name_the_variable(ckpt, tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(FastLoadError, match=name):
        _fast(ckpt, tmp_path / "cache")


def test_tensor_parallel_and_fallback_loads_bypass_it(checkpoints, tmp_path):
    assert "tensor-parallel" in caching.bypass({"tp_plan": "auto"})
    assert caching.bypass({}) is None
    pickled = checkpoints("llama", torch.bfloat16, safetensors=False)
    hf_fastload.fast_from_pretrained(pickled, model_class=LLAMA, dtype=torch.float32, fastload_cache=str(tmp_path))
    report = hf_fastload.last_report()
    assert report.path == "fallback" and report.cache["status"] == "bypassed"


# -- faults ---------------------------------------------------------------------------------------------------------


def _rewrite_in_place(path: str, seed: int) -> None:
    """Same names, shapes, size and header; other values; written into the same inode; mtime set back."""
    file = os.path.join(path, "model.safetensors")
    before = os.stat(file)
    tmp = path + "-other"
    _save(tmp, seed=seed)
    with open(os.path.join(tmp, "model.safetensors"), "rb") as fh:
        data = fh.read()
    with open(file, "r+b") as fh:
        fh.write(data)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(file)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    shutil.rmtree(tmp)


def test_source_changed_between_loads_is_a_miss(ckpt, tmp_path):
    cache = tmp_path / "cache"
    _fast(ckpt, cache)
    time.sleep(0.02)  # the kernel's timestamps are coarse: the rewrite must get another ctime
    _rewrite_in_place(ckpt, seed=1)
    model, report = _fast(ckpt, cache)
    assert report.cache["status"] == "miss"
    assert_same_model(_stock(ckpt), model)
    # replaced by a new file (as save_pretrained or a download does): another inode
    shutil.rmtree(ckpt)
    _save(ckpt, seed=2)
    model, report = _fast(ckpt, cache)
    assert report.cache["status"] == "miss"
    assert_same_model(_stock(ckpt), model)
    assert _fast(ckpt, cache)[1].cache["status"] == "hit"


def test_key_covers_identity_header_and_samples(ckpt):
    with SafetensorsFile(os.path.join(ckpt, "model.safetensors")) as f:
        key, parts = source_key(f)
        assert source_key(f) == (key, parts)
        assert {"dev", "ino", "size", "mtime_ns", "ctime_ns", "header_sha256", "samples_sha256"} <= set(parts)
        assert parts["rules"].startswith("torch ") and parts["format"] == "1"
        content_key, content = source_key(f, "content")
    assert "content_sha256" in content and "ino" not in content and content_key != key


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bytes_appended", "renamed"])
def test_damaged_entry_is_detected_and_rebuilt(ckpt, tmp_path, damage):
    cache = tmp_path / "cache"
    _fast(ckpt, cache)
    [entry] = _entries(cache)
    if damage == "truncate":
        os.truncate(entry, os.path.getsize(entry) // 2)
    elif damage == "garbage":
        with open(entry, "r+b") as fh:
            fh.write(b"\xff" * 64)
    elif damage == "bytes_appended":
        with open(entry, "ab") as fh:
            fh.write(b"\0" * 8)
    else:  # an entry of another source under this source's name
        other = _save(tmp_path / "other", seed=3)
        _fast(other, tmp_path / "cache2")
        [foreign] = _entries(tmp_path / "cache2")
        shutil.copy(foreign, entry)
    model, report = _fast(ckpt, cache)
    assert report.cache["status"] == "miss", report.cache
    assert any("unusable" in w for w in report.cache["warnings"])
    assert_same_model(_stock(ckpt), model)
    [rebuilt] = _entries(cache)
    model, report = _fast(ckpt, cache)
    assert report.cache["status"] == "hit"
    assert_same_model(_stock(ckpt), model)


def test_entry_truncated_after_lookup_is_an_error_not_a_sigbus(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _fast(ckpt, cache)
    [entry] = _entries(cache)
    original = engine_cache.CacheSession._scan

    def scan_then_truncate(self, src):
        original(self, src)
        os.truncate(entry, 4096)  # another process cuts the entry between the lookup and the views

    monkeypatch.setattr(engine_cache.CacheSession, "_scan", scan_then_truncate)
    with pytest.raises(OSError, match="shrank"):
        _fast(ckpt, cache)


def test_a_writer_in_another_process_means_load_without_writing(ckpt, tmp_path):
    cache = tmp_path / "cache"
    store = CacheStore(cache)
    store.ensure()
    with SafetensorsFile(os.path.join(ckpt, "model.safetensors")) as f:
        key, _ = source_key(f)
    fd = store.try_lock(key)  # as if another process were writing this entry
    try:
        model, report = _fast(ckpt, cache)
    finally:
        os.close(fd)
    assert report.cache["status"] == "miss" and report.cache["written"] == 0
    assert "another process is writing" in report.cache["reason"] and report.cache["warnings"] == []
    assert_same_model(_stock(ckpt), model)
    assert _entries(cache) == [] and _leftovers(cache) == []


def _worker(ckpt, cache, go=None, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra)
    args = [sys.executable, os.path.join(HERE, "cache_worker.py"), ckpt, str(cache)] + ([str(go)] if go else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, err[-3000:]
    result = json.loads(lines[-1])
    assert result["ok"], result["error"]
    return result


def _published(cache, timeout: float = 60.0) -> list[str]:
    """The entries once no writer's temporary file is left (a process that ended may have handed off its fsync)."""
    deadline = time.monotonic() + timeout
    while (_leftovers(cache) or not _entries(cache)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _entries(cache)


def test_a_program_that_ends_first_hands_off_publishing(ckpt, tmp_path):
    """The disk is slow (fsync takes a minute): the program exits without waiting, a detached helper publishes."""
    cache = tmp_path / "cache"
    proc = _worker(ckpt, cache, CACHE_WORKER_SLOW_FSYNC="60")
    line = proc.stdout.readline()
    printed = time.monotonic()
    proc.communicate(timeout=120)  # waits for the exit, closes the pipes
    assert time.monotonic() - printed < 40, "the program waited for the slow fsync"
    assert json.loads(line)["cache"]["written"] > 0
    assert len(_published(cache)) == 1 and _leftovers(cache) == []
    assert _result(_worker(ckpt, cache))["cache"]["status"] == "hit"


def test_two_writers_racing_in_two_processes(ckpt, tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [_worker(ckpt, cache, go) for _ in range(2)]
    time.sleep(2.0)  # both have imported torch and transformers and wait for the signal
    go.touch()
    results = [_result(p) for p in procs]  # each compared its model with stock
    # whichever took the lock wrote; the other loaded without writing ("another process is writing"), or, if it
    # came later, mapped the published entry, or, later still, wrote the same entry again (replacing it atomically)
    assert any(r["cache"]["written"] for r in results), results
    assert len(_published(cache)) == 1 and _leftovers(cache) == []
    assert _result(_worker(ckpt, cache))["cache"]["status"] == "hit"


@contextlib.contextmanager
def _tmpfs(path, size: str, read_only: bool = False):
    """A small tmpfs mounted at ``path`` (needs root and mount; the test is skipped otherwise)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_before_writing_is_a_warning(ckpt, tmp_path):
    with _tmpfs(tmp_path / "small", "64k") as cache:  # an entry of this model takes ~130 kB
        model, report = _fast(ckpt, cache)
        assert report.cache["written"] == 0
        assert any("not enough free space" in w for w in report.cache["warnings"]), report.cache
        assert_same_model(_stock(ckpt), model)
        assert _entries(cache) == [] and _leftovers(cache) == []


def test_disk_full_while_writing_is_a_warning(ckpt, tmp_path, monkeypatch):
    """The space goes between the check and the writes (another program fills the disk): pwrite fails with ENOSPC
    on the real filesystem, the load finishes without the entry, nothing is left behind."""
    with _tmpfs(tmp_path / "small", "1m") as cache:
        monkeypatch.setattr(CacheStore, "room", lambda self: 10**12)  # the check sees room; the filesystem has none
        with open(os.path.join(cache, "filler"), "wb") as fh:
            fh.write(b"\0" * 1000 * 1024)
        model, report = _fast(ckpt, cache)
        assert report.cache["written"] == 0 and report.cache["warnings"], report.cache
        assert any("No space left" in w for w in report.cache["warnings"]), report.cache
        assert_same_model(_stock(ckpt), model)
        assert _entries(cache) == [] and _leftovers(cache) == []


def test_enospc_in_the_middle_of_the_load(ckpt, tmp_path, monkeypatch):
    """Simulated (no root needed): the 20th write fails; tensors already placed stay valid views of the dropped
    entry, the rest are converted as usual."""
    calls = []
    real = os.pwrite

    def failing(fd, data, offset):
        calls.append(len(data))
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(engine_cache.os, "pwrite", failing)
    cache = tmp_path / "cache"
    model, report = _fast(ckpt, cache)
    assert len(calls) >= 20 and report.cache["written"] == 0
    assert "No space left" in " ".join(report.cache["warnings"])
    # tensors written before the failure are views of the dropped entry, the others converted as usual
    assert report.methods.get("convert+cache-write", 0) > 0, report.methods
    assert report.methods.get("convert+cache-write", 0) + report.methods.get("convert", 0) == report.tensors_loaded
    assert_same_model(_stock(ckpt), model)
    assert _entries(cache) == [] and _leftovers(cache) == []


def test_read_only_cache_folder(ckpt, tmp_path):
    # a folder that cannot be created: a regular file is in the way
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, report = _fast(ckpt, blocker / "cache")
    assert report.cache["written"] == 0 and "cannot write to the cache folder" in report.cache["warnings"][0]
    assert_same_model(_stock(ckpt), model)
    # a read-only filesystem holding an entry: hits still map it; a miss loads as usual with a warning
    cache = tmp_path / "ro"
    _fast(ckpt, tmp_path / "rw")
    with _tmpfs(cache, "4m") as mounted:
        shutil.copytree(tmp_path / "rw", mounted, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", mounted], check=True)
        model, report = _fast(ckpt, mounted)
        assert report.cache["status"] == "hit"
        assert_same_model(_stock(ckpt), model)
        model, report = _fast(ckpt, mounted, dtype=torch.float16)
        assert report.cache["status"] == "miss" and report.cache["written"] == 0
        assert "Read-only file system" in " ".join(report.cache["warnings"])
        assert_same_model(_stock(ckpt, dtype=torch.float16), model)


def test_cache_on_another_filesystem(ckpt, tmp_path):
    other = "/dev/shm"
    if not os.path.isdir(other) or os.stat(other).st_dev == os.stat(ckpt).st_dev:
        pytest.skip("no second filesystem (/dev/shm) here")
    cache = os.path.join(other, f"hf_fastload-test-{os.getpid()}-{time.time_ns()}")
    try:
        stock = _stock(ckpt)
        for status in ("miss", "hit"):
            model, report = _fast(ckpt, cache)
            assert report.cache["status"] == status
            assert_same_model(stock, model)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_failed_load_leaves_no_entry(ckpt, tmp_path, monkeypatch):
    from hf_fastload.engine import cpu

    real = cpu.convert_mapped
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected conversion failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "convert_mapped", failing)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="injected"):
        _fast(ckpt, cache)
    assert wait_for_writes(60) and _entries(cache) == [] and _leftovers(cache) == []
    monkeypatch.setattr(cpu, "convert_mapped", real)
    model, report = _fast(ckpt, cache)  # the lock was released: this load writes
    assert report.cache["status"] == "miss" and len(_entries(cache)) == 1
    assert_same_model(_stock(ckpt), model)


def test_lru_eviction_and_size_limit(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a, b = _save(tmp_path / "a", seed=1), _save(tmp_path / "b", seed=2)
    _fast(a, cache)
    [entry_a] = _entries(cache)
    size = os.path.getsize(entry_a)
    monkeypatch.setenv("HF_FASTLOAD_CACHE_MAX_GB", str(1.5 * size / 1e9))  # room for one entry, not two
    model, report = _fast(b, cache)
    assert report.cache["status"] == "miss" and report.cache["written"]
    assert_same_model(_stock(b), model)
    [entry_b] = _entries(cache)
    assert entry_b != entry_a  # a, least recently used, was evicted to make room
    monkeypatch.setenv("HF_FASTLOAD_CACHE_MAX_GB", str(size / 2 / 1e9))  # smaller than one entry
    _, report = _fast(a, cache)
    assert report.cache["written"] == 0 and "HF_FASTLOAD_CACHE_MAX_GB" in report.cache["warnings"][0]
    assert _entries(cache) == [entry_b]


# -- hf-fastload cache ----------------------------------------------------------------------------------------------


def test_cache_command_ls_verify_clear(ckpt, tmp_path, capsys):
    cache = tmp_path / "cache"
    other = _save(tmp_path / "other", seed=5)
    _fast(ckpt, cache)
    _fast(other, cache)
    assert cli.main(["cache", "ls", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "2 current" in out and os.path.join(ckpt, "model.safetensors") in out
    assert cli.main(["cache", "verify", "--dir", str(cache)]) == 0
    assert "byte for byte" in capsys.readouterr().out

    shutil.rmtree(other)  # its entry is an orphan now
    entries = _entries(cache)
    own = [e for e in entries if SafetensorsFile(e).metadata()["source"].startswith(os.path.realpath(ckpt))][0]
    with open(own, "r+b") as fh:  # a flipped bit in the data: only verify can see it
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 1]))
    assert cli.main(["cache", "ls", "--dir", str(cache)]) == 0
    assert "1 current, 1 orphan" in capsys.readouterr().out
    assert cli.main(["cache", "verify", "--dir", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "differs from the source" in out and "1 corrupt entries, 1 removed" in out
    assert _entries(cache) == [e for e in entries if e != own]
    assert cli.main(["cache", "clear", "--stale", "--dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and _entries(cache) == []
    _fast(ckpt, cache)
    assert cli.main(["cache", "clear", "--dir", str(cache)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and _entries(cache) == []


def test_cache_command_needs_a_folder(monkeypatch, capsys):
    monkeypatch.delenv("HF_FASTLOAD_CACHE", raising=False)
    assert cli.main(["cache", "ls"]) == 1
    assert "HF_FASTLOAD_CACHE" in capsys.readouterr().err


# -- HF_FASTLOAD_CACHE_WRITE=after: the entry is written by a detached process after the load ------------------------


def test_after_the_load_a_background_process_writes_the_entry(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_CACHE_WRITE", "after")
    cache = tmp_path / "cache"
    stock = _stock(ckpt)
    first, r1 = _fast(ckpt, cache)  # _fast waits for the writer process too
    assert_same_model(stock, first)
    assert r1.cache["status"] == "miss" and r1.cache["write"] == "after" and r1.cache["written"] == 0
    assert len(r1.cache["writer_pids"]) == 1 and "background process" in r1.cache["reason"]
    assert r1.methods == {"convert": r1.tensors_loaded}  # converted into memory, as without the cache
    [entry] = _entries(cache)
    assert _leftovers(cache) == []
    tensors = safetensors.torch.load_file(entry)
    state = stock.state_dict()
    assert len(tensors) == r1.tensors_loaded
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and torch.equal(t, state[name]), name
    second, r2 = _fast(ckpt, cache)
    assert_same_model(stock, second)
    assert r2.cache["status"] == "hit" and r2.methods == {"zero-copy(cache)": r2.tensors_loaded}
    assert r2.cache["writer_pids"] == []


def test_after_and_inline_write_the_same_entry(ckpt, tmp_path, monkeypatch):
    _fast(ckpt, tmp_path / "inline")
    monkeypatch.setenv("HF_FASTLOAD_CACHE_WRITE", "after")
    _fast(ckpt, tmp_path / "after")
    [inline], [after] = _entries(tmp_path / "inline"), _entries(tmp_path / "after")
    assert os.path.basename(inline) == os.path.basename(after)  # same source key, same tensors
    a, b = safetensors.torch.load_file(inline), safetensors.torch.load_file(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _spec(ckpt, cache, **extra) -> dict:
    path = os.path.join(ckpt, "model.safetensors")
    with SafetensorsFile(path) as f:
        key, _ = source_key(f)
        tensors = [[name, "F32"] for name in f.tensors]
    return {"root": str(cache), "key": key, "key_mode": "identity", "max_bytes": None, "source": path, "io": "mmap",
            "threads": 2, "tensors": tensors, **extra}  # fmt: skip


def test_after_writer_refuses_a_changed_source_a_held_lock_and_a_failed_write(ckpt, tmp_path, monkeypatch):
    from hf_fastload.engine import cache_writer

    cache = tmp_path / "cache"
    spec = _spec(ckpt, cache)
    # the source changed between the load and the writer: its key is not the load's any more
    assert "changed since the load" in cache_writer.write_entry({**spec, "key": "0" * 64})
    # another process is writing this source's entry
    store = CacheStore(str(cache))
    store.ensure()
    lock = store.try_lock(spec["key"])
    try:
        assert "another process is writing" in cache_writer.write_entry(spec)
    finally:
        os.close(lock)
    # a write fails (a full disk): no entry, nothing left behind
    def failing(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_writer.os, "pwrite", failing)
    assert cache_writer.write_entry(spec).startswith("no entry written")
    monkeypatch.undo()
    assert _entries(cache) == [] and _leftovers(cache) == []
    # and then it works
    assert cache_writer.write_entry(spec).startswith("published")
    [entry] = _entries(cache)
    state = _stock(ckpt).state_dict()
    assert all(torch.equal(t, state[name]) for name, t in safetensors.torch.load_file(entry).items())


def test_after_writer_process_removes_its_spec_and_survives_the_program(ckpt, tmp_path):
    """The writer runs detached: a program that exits right after its load still gets its entry."""
    cache = tmp_path / "cache"
    code = (
        "import torch, transformers, hf_fastload, os\n"
        f"hf_fastload.fast_from_pretrained({ckpt!r}, model_class=transformers.LlamaForCausalLM, dtype=torch.float32, "
        f"fastload_cache={str(cache)!r})\n"
        "print(hf_fastload.last_report().cache['writer_pids'][0])\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "HF_FASTLOAD_CACHE_WRITE": "after", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pid = int(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 120
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] == "Z":  # reaped by nobody yet: finished
                break
        time.sleep(0.1)
    [entry] = _entries(cache)
    assert _leftovers(cache) == []
    assert len(safetensors.torch.load_file(entry)) > 0


def test_after_with_a_folder_that_cannot_be_created(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_CACHE_WRITE", "after")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, report = _fast(ckpt, blocker / "cache")
    assert report.cache["writer_pids"] == [] and "cannot start the cache writer" in report.cache["warnings"][0]
    assert_same_model(_stock(ckpt), model)


def test_after_starts_no_writer_while_another_holds_the_lock(ckpt, tmp_path, monkeypatch):
    """Loads that end together start one writer: the lock is taken by the loading process and handed over."""
    monkeypatch.setenv("HF_FASTLOAD_CACHE_WRITE", "after")
    cache = tmp_path / "cache"
    store = CacheStore(str(cache))
    store.ensure()
    with SafetensorsFile(os.path.join(ckpt, "model.safetensors")) as f:
        key, _ = source_key(f)
    lock = store.try_lock(key)
    try:
        model, report = _fast(ckpt, cache)
    finally:
        os.close(lock)
    assert report.cache["writer_pids"] == [] and "another process is writing" in report.cache["reason"]
    assert _entries(cache) == [] and _leftovers(cache) == []
    assert_same_model(_stock(ckpt), model)
