"""The tools layer: the ``hf-fastload`` command and the benchmark machinery.

- :mod:`~hf_fastload.tools.cli`: the command line (``run``, ``bench``, ``demo``, ``cache``);
- :mod:`~hf_fastload.tools.run`: ``hf-fastload run``, a program under ``HF_FASTLOAD=1``;
- :mod:`~hf_fastload.tools.cache_cmd`: ``hf-fastload cache ls | verify | clear``, the converted-tensor cache;
- :mod:`~hf_fastload.tools.bench`: stock vs fast vs floor in fresh processes, tables and charts;
- :mod:`~hf_fastload.tools.bench_worker`: one timed load in a fresh process (``python -m``);
- :mod:`~hf_fastload.tools.checkpoint_maker`: Llama-shaped checkpoints of any size, without building the model.
"""
