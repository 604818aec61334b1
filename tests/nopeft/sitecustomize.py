"""Hides peft from this interpreter and every child it starts, as if peft were not installed.

Example:
    ```bash
    PYTHONPATH=tests/nopeft python -m pytest -q tests/test_optin.py   # the opt-in suite without peft
    ```

Python imports ``sitecustomize`` from ``PYTHONPATH`` at startup, before the program; children inherit the variable.
transformers asks ``importlib.util.find_spec("peft")`` whether peft is installed (4.57 when it is imported, 5.x at
the first ``is_peft_available()``, then cached); with ``None`` in ``sys.modules`` that answers None and
``import peft`` raises ``ModuleNotFoundError``, as without the package. ``tests/conftest.py`` prints which view a
run has.
"""

import sys

sys.modules["peft"] = None
