"""transformers' own save/load model tests as a client of the opt-in: the same pass list with ``HF_FASTLOAD=1``.

Example:
    ```bash
    .venvs/tf5/bin/python scripts/hf_model_tests.py               # pip downloads the installed version's sdist
    .venvs/tf5/bin/python scripts/hf_model_tests.py --sdist transformers-5.24.0.tar.gz --keep /tmp/hf-tests
    ```

1. ``pip download transformers==<installed version> --no-binary :all: --no-deps`` fetches the source distribution,
   whose ``tests/`` holds ``test_modeling_common.py`` (``ModelTesterMixin``) but not the per-model test folders;
   ``scripts/hf_model_testers.py`` stands in for those (Llama, Qwen2, Mixtral, GPT-2, BERT, T5, tiny and seeded).
   Modules the mixin imports that the sdist lacks (``tests/generation``, ``tests/exporters``) become empty stubs.
2. The selection is every ``ModelTesterMixin`` test whose body calls ``from_pretrained``, or whose name says it
   saves, loads or ties weights, read from the installed version's own source.
3. It runs twice in fresh processes, side by side, without and with ``HF_FASTLOAD=1`` (which must report at least
   one fast load), and compares the pass lists; each load's report goes to a file per test, and the fallbacks are
   listed by test. Exit status 0 when they are the same, apart from the known differences below.

Known differences: where stock raises ``RuntimeError`` for checkpoint shapes that disagree with the config,
``test_load_with_mismatched_shapes`` and ``test_can_load_ignoring_mismatched_shapes`` assert that class. They are
expected to fail under the opt-in while hf_fastload's shape error is not a ``RuntimeError``; a probe load before the
runs decides, so that they count as real failures once it is.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's hf_fastload, for the probe; the test runs get it on PYTHONPATH
TESTERS = os.path.join(REPO, "scripts", "hf_model_testers.py")
# Tests selected by name on top of those that call from_pretrained: they save, load or tie weights another way.
SELECT_BY_NAME = re.compile(r"save|load|pretrained|tied|tie_|mismatch|keep_in_fp32")
SHAPE_TESTS = ("test_load_with_mismatched_shapes", "test_can_load_ignoring_mismatched_shapes")


def _installed_transformers() -> str:
    import transformers

    return transformers.__version__


def _fetch_sdist(version: str, into: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"transformers=={version}",
        "--no-binary",
        ":all:",
        "--no-deps",
        "-q",
        "-d",
        into,
    ]
    subprocess.run(cmd, check=True)
    (path,) = glob.glob(os.path.join(into, f"transformers-{version}.tar.gz"))
    return path


def _unpack_tests(sdist: str, root: str) -> str:
    """Extracts the sdist's top-level ``tests/*.py`` into ``root/tests`` (a package); returns that folder."""
    tests = os.path.join(root, "tests")
    os.makedirs(tests)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                with open(os.path.join(tests, parts[2]), "wb") as out:
                    out.write(tar.extractfile(member).read())
    if not os.path.isfile(os.path.join(tests, "test_modeling_common.py")):
        raise SystemExit(f"{sdist} has no tests/test_modeling_common.py")
    open(os.path.join(tests, "__init__.py"), "w").close()
    return tests


def _stub_missing_imports(tests: str) -> list[str]:
    """Empty stand-ins for the package-relative modules that test_modeling_common imports and the sdist lacks."""
    source = open(os.path.join(tests, "test_modeling_common.py"), encoding="utf-8").read()
    stubbed = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and node.level == 1 and node.module):
            continue
        path = os.path.join(tests, *node.module.split(".")) + ".py"
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        folder = os.path.dirname(path)
        while folder != tests:
            open(os.path.join(folder, "__init__.py"), "a").close()
            folder = os.path.dirname(folder)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(f"class {alias.name}:\n    pass\n\n\n" for alias in node.names))
        stubbed.append(f".{node.module}: {', '.join(a.name for a in node.names)}")
    return stubbed


def _selection(tests: str) -> list[str]:
    """Names of the ModelTesterMixin tests that save, load or tie weights, from the installed version's source."""
    source = open(os.path.join(tests, "test_modeling_common.py"), encoding="utf-8").read()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "ModelTesterMixin":
            return sorted(
                f.name
                for f in node.body
                if isinstance(f, ast.FunctionDef)
                and f.name.startswith("test_")
                and ("from_pretrained" in ast.get_source_segment(source, f) or SELECT_BY_NAME.search(f.name))
            )
    raise SystemExit("test_modeling_common.py has no ModelTesterMixin")


_CONFTEST = """
import os
import re

import pytest


@pytest.fixture(autouse=True)
def _report_per_test(request):  # each test's loads go to a report file of its own (read per load by hf_fastload)
    folder = os.environ.get("HF_FASTLOAD_REPORT_DIR")
    if folder:
        name = re.sub(r"[^\\w.-]+", "_", request.node.nodeid.split("::", 1)[-1])
        os.environ["HF_FASTLOAD_REPORT"] = os.path.join(folder, name + ".jsonl")
    yield


def pytest_configure(config):  # transformers' own markers, registered by its repository conftest (not shipped)
    for name in ("accelerate_tests", "flash_attn_test", "torch_compile_test", "torch_export_test", "flash_attn_3_test",
                 "bitsandbytes", "generate", "is_training_test", "is_tensor_parallel_test", "is_pipeline_test"):
        config.addinivalue_line("markers", name)
"""


def _shape_error_is_runtime_error() -> bool:
    """Whether the fast path raises a RuntimeError, as stock does, for checkpoint shapes unlike the config's."""
    import torch
    import transformers

    import hf_fastload

    transformers.logging.set_verbosity_error()  # the probe's own mismatch report is no news
    transformers.logging.disable_progress_bar()
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        config.vocab_size = 48
        try:
            hf_fastload.fast_from_pretrained(folder, model_class=transformers.LlamaForCausalLM, config=config)
        except RuntimeError:
            return True
        except Exception:
            return False
    raise SystemExit("probe: a checkpoint whose shapes disagree with the config loaded without an error")


class _Run:
    """One pytest run of the selected tests in a fresh process, without or with ``HF_FASTLOAD=1``."""

    def __init__(self, root: str, tests: list[str], opt_in: bool, report: str):
        tag = "fast" if opt_in else "stock"
        self.xml, self.log = os.path.join(root, f"results-{tag}.xml"), os.path.join(root, f"pytest-{tag}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
        env.pop("TRANSFORMERS_VERBOSITY", None)  # the tests read transformers' warnings
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        env["PYTHONPATH"] = os.pathsep.join([REPO, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
        if opt_in:
            os.makedirs(report)
            env.update(HF_FASTLOAD="1", HF_FASTLOAD_REPORT_DIR=report)
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", root]
        selection = ["-k", " or ".join(tests), os.path.join("tests", "test_fastload_models.py")]
        self.start = time.perf_counter()
        with open(self.log, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [*pytest, f"--junitxml={self.xml}", *selection], cwd=root, env=env, stdout=log, stderr=log
            )

    def wait(self) -> tuple[dict[str, str], tuple[float, float]]:
        """{test id: outcome}, and the (wall, CPU) seconds the run took."""
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = (time.perf_counter() - self.start, usage.ru_utime + usage.ru_stime)
        if not os.path.exists(self.xml):
            with open(self.log, encoding="utf-8") as log:
                sys.stderr.write(log.read()[-5000:])
            raise SystemExit(f"pytest did not run (exit code {self.proc.returncode})")
        outcomes = {}
        for case in ET.parse(self.xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
            outcomes[name] = {"failure": "failed", "error": "error"}.get(outcome, outcome)
        return outcomes, seconds


def _print_list(title: str, names: list[str]) -> None:
    print(f"{title} ({len(names)}):")
    for name in names:
        print(f"    {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", help="transformers-<installed version>.tar.gz to use instead of downloading it")
    parser.add_argument("--keep", help="work in this (new) folder and keep it, instead of a temporary one")
    parser.add_argument("--json", help="write both outcome lists and the timings to this file")
    parser.add_argument("--serial", action="store_true", help="one run after the other (default: side by side)")
    args = parser.parse_args(argv)

    version = _installed_transformers()
    root = args.keep or tempfile.mkdtemp(prefix="hf-model-tests-")
    if args.keep:
        os.makedirs(root)
    try:
        t0 = time.perf_counter()
        sdist = args.sdist or _fetch_sdist(version, root)
        if f"transformers-{version}.tar.gz" != os.path.basename(sdist):
            raise SystemExit(f"{sdist} is not the installed transformers {version}'s sdist")
        tests = _unpack_tests(sdist, root)
        stubs = _stub_missing_imports(tests)
        shutil.copy(TESTERS, os.path.join(tests, "test_fastload_models.py"))
        with open(os.path.join(root, "conftest.py"), "w", encoding="utf-8") as fh:
            fh.write(_CONFTEST)
        selection = _selection(tests)
        shapes_expected = not _shape_error_is_runtime_error()
        prepared = time.perf_counter() - t0
        print(
            f"transformers {version}: {len(selection)} ModelTesterMixin tests that save, load or tie weights; "
            f"stubs for {stubs or 'nothing'}"
        )

        report = os.path.join(root, "loads")
        if args.serial:
            stock, stock_s = _Run(root, selection, False, report).wait()
            fast, fast_s = _Run(root, selection, True, report).wait()
        else:  # side by side: each run is one process, mostly on one core
            runs = [_Run(root, selection, opt_in, report) for opt_in in (False, True)]
            (stock, stock_s), (fast, fast_s) = (run.wait() for run in runs)
        loads: dict[str, list[dict]] = {}
        for path in sorted(glob.glob(os.path.join(report, "*.jsonl"))):
            with open(path, encoding="utf-8") as fh:
                loads[os.path.basename(path).removesuffix(".jsonl")] = [json.loads(line) for line in fh]
        every = [load for per_test in loads.values() for load in per_test]
        paths = {p: sum(1 for load in every if load["path"] == p) for p in ("fast", "fallback")}
        fallbacks = sorted(
            f"{test}: {sum(1 for x in per_test if x['reason'] == reason)} x {reason}"
            for test, per_test in loads.items()
            for reason in {x["reason"] for x in per_test if x["path"] == "fallback"}
        )

        passed = {name for name, outcome in stock.items() if outcome == "passed"}
        passed_fast = {name for name, outcome in fast.items() if outcome == "passed"}
        _print_list("passed without the opt-in", sorted(passed))
        _print_list("passed with HF_FASTLOAD=1", sorted(passed_fast))
        not_passed = sorted(f"{name}: {outcome}" for name, outcome in stock.items() if outcome != "passed")
        _print_list("not passed without the opt-in (skipped or failed in both is no difference)", not_passed)
        lost, gained = sorted(passed - passed_fast), sorted(passed_fast - passed)
        expected = [n for n in lost if shapes_expected and n.split("::")[1].split("[")[0] in SHAPE_TESTS]
        unexpected = [n for n in lost if n not in expected]
        print(f"\nloads under HF_FASTLOAD=1: {paths['fast']} fast, {paths['fallback']} fallback")
        for line in fallbacks:
            print(f"    fallback in {line}")
        print(
            f"time: prepare {prepared:.0f} s; without the opt-in {stock_s[0]:.0f} s ({stock_s[1]:.0f} s CPU), "
            f"with it {fast_s[0]:.0f} s ({fast_s[1]:.0f} s CPU)"
        )
        if expected:
            _print_list(
                "EXPECTED DIFFERENCE, pass only without the opt-in: hf_fastload's shape-mismatch error is "
                "not a RuntimeError yet (issue 11, exception classes)",
                expected,
            )
        if unexpected:
            _print_list("DIFFERENCE: pass only without the opt-in", unexpected)
        if gained:
            _print_list("DIFFERENCE: pass only with the opt-in", gained)
        ok = not unexpected and not gained and paths["fast"] > 0 and set(stock) == set(fast)
        if paths["fast"] == 0:
            print("DIFFERENCE: the opt-in loaded nothing fast (is hf_fastload installed in this environment?)")
        note = f" ({len(expected)} expected differences)" if expected else ""
        print(
            f"\n{'SAME' if ok else 'NOT THE SAME'}: {len(passed_fast)} of {len(fast)} passed with HF_FASTLOAD=1, "
            f"{len(passed)} of {len(stock)} without{note}"
        )
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "transformers": version,
                        "selection": selection,
                        "stock": stock,
                        "fast": fast,
                        "seconds": {"prepare": prepared, "stock": stock_s, "fast": fast_s},
                        "loads": paths,
                        "expected_differences": expected,
                        "unexpected": unexpected,
                        "gained": gained,
                    },
                    fh,
                    indent=1,
                )
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
