"""Conversion to and from other checkpoint formats (Hugging Face ``transformers``) and downstream evaluation."""
