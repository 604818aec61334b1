"""The format layer: safetensors files and checkpoint folders, as bytes and validated headers.

- :mod:`~hf_fastload.format.header`: parsing and validating a header (``TensorInfo``: dtype, shape, byte range);
- :mod:`~hf_fastload.format.file`: an open file (``SafetensorsFile``): mapped views, ``pread``, size checks;
- :mod:`~hf_fastload.format.index`: a folder: the sharded index and its consistency with the shards;
- :mod:`~hf_fastload.format.writer`: headers of files whose tensors are placed by the writer (the cache's entries).

Knows nothing of models, devices or transformers; everything above builds on it. Errors come from
:mod:`hf_fastload.errors`.
"""
