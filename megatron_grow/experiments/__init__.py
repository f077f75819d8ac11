"""Experiments built on the package's public APIs: ``demo`` (``megatron-grow demo``) and ``repro``
(``megatron-grow repro``), with what they share in ``common``."""
