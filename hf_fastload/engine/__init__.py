"""The engine layer: checkpoint bytes to tensors on a device, fast and bit-identical to ``.to(device, dtype)``.

- :mod:`~hf_fastload.engine.knobs`: ``HF_FASTLOAD_THREADS``, ``HF_FASTLOAD_IO``;
- :mod:`~hf_fastload.engine.pools`: the reader threads;
- :mod:`~hf_fastload.engine.cpu`: CPU tensors (zero-copy views, ``pread``, chunked conversion);
- :mod:`~hf_fastload.engine.stream`: the device pipeline (reader threads, ring slots, side streams, device-side
  casts), over :mod:`~hf_fastload.engine.ring` (the host ring), :mod:`~hf_fastload.engine.backends` (CUDA, the CPU
  for direct I/O) and :mod:`~hf_fastload.engine.casting` (conversions with the CPU's bits);
  :mod:`~hf_fastload.engine.standin` is a stand-in device for tests without a GPU;
- :mod:`~hf_fastload.engine.slices`: a block of a tensor (a tensor-parallel shard), reading only its bytes;
- :mod:`~hf_fastload.engine.cache`: the converted-tensor cache in a load (hits mapped, misses written while
  converting), over :mod:`~hf_fastload.engine.cache_store` (the folder: keys, entries, locks, eviction, checks);
- :mod:`~hf_fastload.engine.materialize`: the entry: which of the above makes a tensor;
- :mod:`~hf_fastload.engine.handle`: the ``safe_open``-compatible handle and lazy ``TensorSlice`` transformers reads;
- :mod:`~hf_fastload.engine.context`: one load's files, I/O choices, pipelines, errors and counters.

Builds on :mod:`hf_fastload.format`; knows nothing of transformers.
"""
