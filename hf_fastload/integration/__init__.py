"""The transformers integration layer: hf_fastload's engine behind ``from_pretrained``, stock semantics kept.

- :mod:`~hf_fastload.integration.compat`: every transformers 4.57 / 5.x difference, and the scoped hooks that hand
  a load's bytes path to the engine;
- :mod:`~hf_fastload.integration.api`: ``fast_from_pretrained`` (cheap to import) over
  :mod:`~hf_fastload.integration.loader`, the load itself;
- :mod:`~hf_fastload.integration.fallback`: which loads stay on stock, and why;
- :mod:`~hf_fastload.integration.caching`: the converted-tensor cache's setting (``fastload_cache``,
  ``HF_FASTLOAD_CACHE``), which loads use it, its report;
- :mod:`~hf_fastload.integration.checks`: the post-load verification, shape-mismatch errors;
- :mod:`~hf_fastload.integration.distributed`: tensor-parallel arguments, rank and world size;
- :mod:`~hf_fastload.integration.routing`: ``from_pretrained`` of every model class through the loader;
- :mod:`~hf_fastload.integration.inference`: ``inference_mode`` / ``training_mode`` of a loaded model;
- :mod:`~hf_fastload.integration.noinit`: ``skip_init`` and the global init switch;
- :mod:`~hf_fastload.integration.patching`: the reversible, refcounted patches all of the above install.
"""
