"""The opt-in without code changes: ``HF_FASTLOAD=1``, ``hf-fastload run``, ``enable()``/``disable()``/``enabled()``.

What concerns the startup hook runs in fresh interpreters (the hook acts when one starts), each with
``HF_HUB_OFFLINE=1``; they need hf_fastload installed (``pip install -e .``), which ships ``hf_fastload_startup.pth``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from test_pipeline import _llama, make_tokenizer
from transformers.models.auto.auto_factory import _BaseAutoModelClass

import hf_fastload
import hf_fastload_startup
from hf_fastload.features import hook, optin, startup
from hf_fastload.integration import routing
from hf_fastload.tools import cli, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "optin_script.py")
PTH = "hf_fastload_startup.pth"


def _env(**extra: str | None) -> dict[str, str]:
    """This environment without hf_fastload's variables, offline, plus ``extra`` (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
    env["HF_HUB_OFFLINE"] = "1"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _python(args: list[str], env: dict[str, str], cwd: str | None = None, timeout: int = 300):
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _report_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def hook_installed() -> None:
    """Fails, saying how to fix it, when this Python's site-packages lacks hf_fastload_startup.pth."""
    code = "import sys; print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))"
    out = _python(["-c", code], _env(HF_FASTLOAD="1")).stdout.strip()
    if out != "True":
        pytest.fail(f"{PTH} is not in {sys.prefix}'s site-packages: reinstall hf_fastload (pip install -e .)")


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> str:
    """A tiny Llama with a tokenizer (so that optin_script.py also runs a pipeline)."""
    folder = str(tmp_path_factory.mktemp("llm"))
    tok = make_tokenizer(folder, template=False)
    torch.manual_seed(0)
    _llama(len(tok), tok).save_pretrained(folder)
    return folder


def _originals() -> dict[str, object]:
    import transformers.pipelines

    return {
        "PreTrainedModel.from_pretrained": transformers.PreTrainedModel.__dict__["from_pretrained"],
        "_BaseAutoModelClass.from_pretrained": _BaseAutoModelClass.__dict__["from_pretrained"],
        "transformers.pipeline": transformers.pipeline,
        "transformers.pipelines.pipeline": transformers.pipelines.pipeline,
    }


def _assert_restored(before: dict[str, object]) -> None:
    after = _originals()
    assert all(after[k] is v for k, v in before.items()), [k for k, v in before.items() if after[k] is not v]
    assert not optin.is_enabled() and not routing.is_routing()


def _assert_patched(before: dict[str, object]) -> None:
    now = _originals()
    assert all(now[k] is not v for k, v in before.items())
    assert transformers.pipeline is transformers.pipelines.pipeline
    assert optin.is_enabled() and routing.is_routing()


# --- the startup hook, in fresh interpreters ---------------------------------------------------------------------


def test_script_output_is_identical_stock_env_and_run(hook_installed, llm_folder, tmp_path):
    stock = _python([SCRIPT, llm_folder], _env(HF_FASTLOAD_REPORT=str(tmp_path / "stock.jsonl")))
    by_env = _python([SCRIPT, llm_folder], _env(HF_FASTLOAD="1", HF_FASTLOAD_REPORT=str(tmp_path / "env.jsonl")))
    report = str(tmp_path / "run.jsonl")
    by_run = _python(["-m", "hf_fastload.tools.cli", "run", "--report", report, SCRIPT, llm_folder], _env())

    assert "logits sha256:" in stock.stdout and "pipeline:" in stock.stdout
    assert by_env.stdout == stock.stdout
    assert by_run.stdout == stock.stdout
    assert not (tmp_path / "stock.jsonl").exists()
    for name in ("env.jsonl", "run.jsonl"):
        lines = _report_lines(tmp_path / name)
        assert len(lines) == 2, lines  # AutoModelForCausalLM.from_pretrained, then the pipeline's model
        assert [line["path"] for line in lines] == ["fast", "fast"]
        assert all(line["source"] == llm_folder and line["tensors_loaded"] > 0 for line in lines)


_PROBE = """
import os, sys
import transformers
from transformers.modeling_utils import PreTrainedModel

model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("hf_fastload imported:", "hf_fastload" in sys.modules)
code = PreTrainedModel.__dict__["from_pretrained"].__func__.__code__
print("from_pretrained in", os.path.basename(code.co_filename))
print("pipeline in", os.path.basename(transformers.pipeline.__code__.co_filename), transformers.pipeline.__name__)
print("finder:", any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path))
"""


@pytest.mark.parametrize("value", [None, "0"])
def test_off_patches_nothing_and_writes_no_report(hook_installed, checkpoints, tmp_path, value):
    report = tmp_path / "loads.jsonl"
    proc = _python(["-c", _PROBE, checkpoints("llama")], _env(HF_FASTLOAD=value, HF_FASTLOAD_REPORT=str(report)))
    assert proc.stdout.splitlines() == [
        "hf_fastload imported: False",
        "from_pretrained in modeling_utils.py",
        "pipeline in __init__.py pipeline",
        "finder: False",
    ]
    assert not report.exists()
    assert "hf_fastload" not in proc.stderr


def test_on_patches_right_after_transformers_is_imported(hook_installed, checkpoints, tmp_path):
    report = tmp_path / "loads.jsonl"
    proc = _python(["-c", _PROBE, checkpoints("llama")], _env(HF_FASTLOAD="TRUE", HF_FASTLOAD_REPORT=str(report)))
    assert proc.stdout.splitlines() == [
        "hf_fastload imported: True",
        "from_pretrained in routing.py",
        "pipeline in optin.py pipeline",  # the wrapper keeps the original's name
        "finder: False",  # it removed itself once transformers was imported
    ]
    assert [line["path"] for line in _report_lines(report)] == ["fast"]


_FROM_IMPORT = """
from transformers import pipeline
import transformers
print(pipeline is transformers.pipeline, pipeline.__code__.co_filename.endswith("optin.py"))
"""


def test_from_transformers_import_pipeline(hook_installed):
    """transformers.pipelines imports modeling_utils while it runs; the hook of the latter must not read the former's
    half-made names (it did, and printed "running without hf_fastload" while running with it)."""
    proc = _python(["-c", _FROM_IMPORT], _env(HF_FASTLOAD="1"))
    assert proc.stdout.split() == ["True", "True"]
    assert "hf_fastload" not in proc.stderr, proc.stderr


_HEAVY = """
import sys
import transformers
print(sorted(m for m in ("torch", "transformers.modeling_utils", "transformers.pipelines") if m in sys.modules))
"""


def test_on_imports_nothing_heavy_until_the_program_does(hook_installed):
    """A program that imports transformers for a tokenizer pays nothing for the opt-in: the patches wait for
    modeling_utils and the pipelines to be imported by the program (measured before this: 1.3 s -> 7 s)."""
    stock = _python(["-c", _HEAVY], _env()).stdout
    opted = _python(["-c", _HEAVY], _env(HF_FASTLOAD="1")).stdout
    assert opted == stock and "transformers.pipelines" not in opted and "modeling_utils" not in opted


_SPAWN = """
import multiprocessing
import sys


def load(path):
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(path)


if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=load, args=(sys.argv[1],))
    child.start()
    child.join()
    print("parent imported transformers:", "transformers" in sys.modules)
    sys.exit(child.exitcode)
"""


def test_spawned_child_inherits_the_opt_in(hook_installed, checkpoints, tmp_path):
    script = tmp_path / "spawn_parent.py"
    script.write_text(_SPAWN, encoding="utf-8")
    report = tmp_path / "loads.jsonl"
    proc = _python([str(script), checkpoints("llama")], _env(HF_FASTLOAD="1", HF_FASTLOAD_REPORT=str(report)))
    assert "parent imported transformers: False" in proc.stdout
    assert [line["path"] for line in _report_lines(report)] == ["fast"]


def _import_us(env: dict[str, str]) -> tuple[dict[str, int], str]:
    """``python -X importtime`` at startup: cumulative microseconds by module name, and the program's stdout."""
    code = "import sys; print('transformers' in sys.modules, 'torch' in sys.modules)"
    proc = _python(["-X", "importtime", "-c", code], env)
    times = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)", line)
        if m:
            times[m.group(3)] = int(m.group(2))
    return times, proc.stdout.strip()


def test_startup_import_budget(hook_installed):
    # unset: the .pth line does not even import the hook module
    times, out = _import_us(_env())
    assert out == "False False"
    assert "hf_fastload_startup" not in times and "hf_fastload" not in times
    # set but false: the hook module, which imports nothing new, well under 5 ms; the best of three runs, with its
    # bytecode cached as pip caches it (without a cache the first compile in a process alone takes about 3 ms)
    env = _env(HF_FASTLOAD="0", PYTHONDONTWRITEBYTECODE=None)
    runs = [_import_us(env) for _ in range(3)]
    assert all(out == "False False" for _, out in runs)
    assert all(set(t) & {"hf_fastload_startup", "transformers", "torch", "hf_fastload"} == {"hf_fastload_startup"}
               for t, _ in runs)  # fmt: skip
    best = min(t["hf_fastload_startup"] for t, _ in runs)
    assert best < 5000, f"hf_fastload_startup took {best} us to import"
    # on: the hook waits for transformers, importing neither it nor torch
    _, out = _import_us(_env(HF_FASTLOAD="1"))
    assert out == "False False"


def test_startup_failure_is_one_line_and_the_program_runs(monkeypatch, capsys):
    def broken():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setenv("HF_FASTLOAD", "1")
    monkeypatch.setattr(startup, "install", broken)
    hf_fastload_startup.main()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: boom second line" in err


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" on ", True), ("", False),
     ("0", False), ("false", False), ("no", False), ("off", False), ("2", False), ("enable", False), (None, False)],
)  # fmt: skip
def test_truthy_values(value, expected):
    assert hf_fastload_startup.requested({} if value is None else {"HF_FASTLOAD": value}) is expected


# --- the post-import hook, in this process, on a throwaway module -------------------------------------------------


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    name = f"hf_fastload_probe_{random.randrange(1 << 30)}"
    (tmp_path / f"{name}.py").write_text("VALUE = 42\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "name", None) != name]


def test_post_import_hook_runs_once_after_the_module(probe_module):
    seen = []
    hook.when_imported(probe_module, lambda m: seen.append(m.VALUE))
    hook.when_imported(probe_module, lambda m: seen.append("twice"))  # one finder per module name
    assert importlib.util.find_spec(probe_module) is not None and seen == []  # a look-up alone runs nothing
    module = importlib.import_module(probe_module)
    assert seen == [42] and module.VALUE == 42
    assert not any(getattr(f, "name", None) == probe_module for f in sys.meta_path)
    importlib.reload(module)
    assert seen == [42]
    hook.when_imported(probe_module, lambda m: seen.append("now"))  # already imported: at once
    assert seen == [42, "now"]


def test_post_import_hook_failure_is_one_line(probe_module, capsys):
    hook.when_imported(probe_module, lambda m: 1 / 0)
    assert importlib.import_module(probe_module).VALUE == 42
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ZeroDivisionError" in err


# --- enable() / disable() / enabled(), in this process -------------------------------------------------------------


def test_enable_is_idempotent_and_disable_restores_the_originals():
    before = _originals()
    try:
        hf_fastload.enable()
        _assert_patched(before)
        patched = _originals()
        hf_fastload.enable()
        assert all(_originals()[k] is v for k, v in patched.items())  # nothing wrapped twice
    finally:
        hf_fastload.disable()
    _assert_restored(before)
    hf_fastload.disable()
    _assert_restored(before)


def test_enabled_blocks_nest_and_combine_with_the_switch():
    before = _originals()
    with hf_fastload.enabled():
        _assert_patched(before)
        with hf_fastload.enabled():
            _assert_patched(before)
        _assert_patched(before)  # the outer block is still open
        hf_fastload.disable()  # the switch was off; the block keeps it on
        _assert_patched(before)
    _assert_restored(before)
    try:
        hf_fastload.enable()
        with hf_fastload.enabled():
            pass
        _assert_patched(before)  # the switch is still on
    finally:
        hf_fastload.disable()
    _assert_restored(before)
    with pytest.raises(KeyError):
        with hf_fastload.enabled():
            raise KeyError("restored on the way out")
    _assert_restored(before)


def test_patched_callables_keep_names_docstrings_and_signatures():
    before = _originals()
    with hf_fastload.enabled():
        now = _originals()
        for key, original in before.items():
            original, wrapped = (getattr(x, "__func__", x) for x in (original, now[key]))
            assert wrapped.__name__ == original.__name__ and wrapped.__doc__ == original.__doc__, key
            assert wrapped.__module__ == original.__module__, key
            assert inspect.signature(wrapped) == inspect.signature(original), key
        bound = inspect.signature(transformers.AutoModelForCausalLM.from_pretrained)
    assert bound == inspect.signature(transformers.AutoModelForCausalLM.from_pretrained)


def test_concurrent_enable_disable_and_blocks_end_consistent():
    before = _originals()
    errors = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(40):
                action = rng.choice(("enable", "disable", "block"))
                if action == "block":
                    with hf_fastload.enabled():
                        assert optin.is_enabled() and transformers.pipeline is transformers.pipelines.pipeline
                else:
                    getattr(hf_fastload, action)()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hf_fastload.disable()
    assert not errors, errors
    _assert_restored(before)
    assert optin._blocks == 0 and routing.PATCHES.users == 0


def _equal_models(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_loads_under_enable_are_fast_and_equal_stock(checkpoints):
    folder = checkpoints("llama")
    stock = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with hf_fastload.enabled():
        fast = transformers.AutoModelForCausalLM.from_pretrained(folder)
        report = hf_fastload.last_report()
        direct = transformers.LlamaForCausalLM.from_pretrained(folder)
    assert report.source == folder and report.path == "fast" and report.tensors_loaded > 0
    assert hf_fastload.last_report() is not report  # the concrete class's call was routed too
    assert _equal_models(fast, stock) and _equal_models(direct, stock)


def test_pipeline_under_enable_is_fast_pipeline(llm_folder):
    args = ("text-generation",)
    kwargs = {"model": llm_folder, "tokenizer": llm_folder}
    stock = transformers.pipeline(*args, **kwargs)("the quick brown fox", max_new_tokens=6, do_sample=False)
    with hf_fastload.enabled():
        pipe = transformers.pipeline(*args, **kwargs)
        assert hf_fastload.last_report().source == llm_folder
        out = pipe("the quick brown fox", max_new_tokens=6, do_sample=False)
    assert out == stock


class OverridingLlama(transformers.LlamaForCausalLM):
    calls = 0

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A subclass's own from_pretrained, with work before and after super()'s."""
        cls.calls += 1
        out = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out).loaded_by_override = cls.calls
        return out


def test_class_overriding_from_pretrained(checkpoints):
    folder = checkpoints("llama")
    OverridingLlama.calls = 0
    stock = OverridingLlama.from_pretrained(folder)
    with hf_fastload.enabled():
        fast, info = OverridingLlama.from_pretrained(folder, output_loading_info=True)
        report = hf_fastload.last_report()
    assert OverridingLlama.calls == 2  # once per call: the routed load does not run the override again
    assert type(fast) is OverridingLlama and fast.loaded_by_override == 2 and stock.loaded_by_override == 1
    assert report.path == "fast" and report.model_class == "OverridingLlama"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert _equal_models(fast, stock)


# --- HF_FASTLOAD_REPORT --------------------------------------------------------------------------------------------


def test_report_file_gets_a_line_per_load_fallback_included(checkpoints, tmp_path, monkeypatch):
    report = tmp_path / "loads.jsonl"
    monkeypatch.setenv("HF_FASTLOAD_REPORT", str(report))
    hf_fastload.fast_from_pretrained(checkpoints("llama"))
    hf_fastload.fast_from_pretrained(checkpoints("gpt2", safetensors=False))
    lines = _report_lines(report)
    assert [line["path"] for line in lines] == ["fast", "fallback"]
    assert lines[1] == json.loads(json.dumps(hf_fastload.last_report().to_dict()))
    assert lines[0]["source"] == checkpoints("llama") and lines[0]["tensors_loaded"] > 0 and lines[1]["reason"]


def test_report_write_failure_warns_and_returns_the_model(checkpoints, tmp_path, monkeypatch):
    from hf_fastload.integration import loader

    warnings = []

    class Logger:
        def warning(self, message):
            warnings.append(message)

    monkeypatch.setattr(loader, "_logger", Logger)
    monkeypatch.setenv("HF_FASTLOAD_REPORT", str(tmp_path))  # a folder: cannot be opened for appending
    model = hf_fastload.fast_from_pretrained(checkpoints("llama"))
    assert model is not None and hf_fastload.last_report().path == "fast"
    assert len(warnings) == 1 and "HF_FASTLOAD_REPORT" in warnings[0]


# --- hf-fastload run -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, ours, program",
    [
        (["s.py", "--verbose", "-m", "x"], [], ["s.py", "--verbose", "-m", "x"]),
        (["--report", "r.jsonl", "--verbose", "s.py", "a"], ["--report", "r.jsonl", "--verbose"], ["s.py", "a"]),
        (["--report=r.jsonl", "-m", "pkg.mod", "--flag", "-m"], ["--report=r.jsonl", "-m", "pkg.mod"],
         ["--flag", "-m"]),
        (["-mpkg", "a"], ["-mpkg"], ["a"]),
        (["--verbose", "--", "-weird.py"], ["--verbose"], ["-weird.py"]),
        (["--unknown", "s.py"], ["--unknown"], ["s.py"]),
        ([], [], []),
    ],
)  # fmt: skip
def test_run_splits_its_options_from_the_program(argv, ours, program):
    assert run.split_run_argv(argv) == (ours, program)


def test_run_sets_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd, env = run.run_command(["s.py", "a"], report="r.jsonl", verbose=True)
    assert env["HF_FASTLOAD"] == "1" and env["HF_FASTLOAD_VERBOSE"] == "1"
    assert env["HF_FASTLOAD_REPORT"] == str(tmp_path / "r.jsonl")
    assert cmd == [sys.executable, "s.py", "a"]  # the .pth hook is active in this interpreter
    cmd, env = run.run_command(["a"], module="pkg.mod")
    assert cmd == [sys.executable, "-m", "pkg.mod", "a"] and "HF_FASTLOAD_REPORT" not in env


def test_run_errors_without_a_program(capsys):
    assert cli.main(["run"]) == 1
    assert "needs a script" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--report"])


_SHOW = """
import os, sys
print(sys.argv[1:], os.environ["HF_FASTLOAD"], __name__)
print(any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path))
sys.exit(int(sys.argv[-1]))
"""


def test_run_executes_script_and_module_with_their_exit_codes(hook_installed, tmp_path):
    (tmp_path / "show.py").write_text(_SHOW, encoding="utf-8")
    for target in (["show.py"], ["-m", "show"]):
        proc = subprocess.run([sys.executable, "-m", "hf_fastload.tools.cli", "run", *target, "--x", "3"],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.splitlines() == ["['--x', '3'] 1 __main__", "True"]


def test_run_bootstrap_without_the_pth_hook(tmp_path):
    """Where site did not run hf_fastload_startup.pth, ``run`` installs the hook in the program's process."""
    (tmp_path / "show.py").write_text(_SHOW, encoding="utf-8")
    for target in (["show.py"], ["-m", "show"]):
        proc = subprocess.run([sys.executable, "-c", run._BOOTSTRAP, *target, "--x", "0"], cwd=tmp_path,
                              env=_env(HF_FASTLOAD="0"), capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == ["['--x', '0'] 0 __main__", "True"]


# --- packaging -----------------------------------------------------------------------------------------------------


def test_wheel_ships_the_pth_at_the_root(tmp_path):
    """Builds a wheel of a copy of the source tree and installs it into a folder: the .pth lands at its root."""
    pytest.importorskip("setuptools", reason="builds without isolation need setuptools in this environment")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "hf_fastload_startup.py", PTH):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "hf_fastload"), src / "hf_fastload", ignore=shutil.ignore_patterns("*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), str(src)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("hf_fastload-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / PTH).read_text() == open(os.path.join(REPO, PTH)).read()
    assert (target / "hf_fastload_startup.py").is_file()
    assert (target / "hf_fastload" / "features" / "optin.py").is_file()
