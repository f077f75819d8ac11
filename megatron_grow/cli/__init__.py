"""Subcommands of ``megatron-grow``; one module each (see ``megatron_grow/__main__.py``)."""
