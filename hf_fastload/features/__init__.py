"""The features layer: what users call on top of the loader.

- :mod:`~hf_fastload.features.pipeline`: ``fast_pipeline``, ``transformers.pipeline`` with fast loads and
  inference-mode forwards;
- :mod:`~hf_fastload.features.optin`: ``enable`` / ``disable`` / ``enabled``, every ``from_pretrained`` and
  ``pipeline()`` of a program through hf_fastload;
- :mod:`~hf_fastload.features.startup` and :mod:`~hf_fastload.features.hook`: ``HF_FASTLOAD=1`` at interpreter start,
  and the post-import hooks it (and the opt-in) wait on transformers with.
"""
