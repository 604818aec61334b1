"""Writes the files of ``tests/data/written_by/safetensors-<version>/`` with that version of safetensors installed.

Example:
    ```bash
    python3 -m venv /tmp/st && /tmp/st/bin/pip install numpy "safetensors==0.3.0"
    /tmp/st/bin/python tests/data/written_by/write.py tests/data/written_by/safetensors-0.3.0
    ```
"""

import sys

import numpy as np
import safetensors
from safetensors.numpy import save_file

out = sys.argv[1]
version = getattr(safetensors, "__version__", out.rsplit("-", 1)[-1])
rng = np.random.default_rng(0)
tensors = {
    "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
    "b.half": rng.standard_normal((7,)).astype(np.float16),
    "c.double": rng.standard_normal((2, 2)).astype(np.float64),
    "d.ids": np.arange(5, dtype=np.int64),
    "e.int8": np.arange(-3, 4, dtype=np.int8),
    "f.uint8": np.arange(9, dtype=np.uint8),
    "g.mask": np.array([True, False, True]),
    "h.int16": np.arange(3, dtype=np.int16),
    "i.int32": np.arange(11, dtype=np.int32),
    "j.empty": np.zeros((0, 4), dtype=np.float32),
    "k.scalar": np.array(2.5, dtype=np.float32),
    "zz.name-with-dash.0": np.ones((1,), dtype=np.float32),
}
save_file(tensors, f"{out}/mixed.safetensors", metadata={"format": "np", "written_by": f"safetensors {version}"})
save_file({}, f"{out}/empty.safetensors")
