"""Integrations of the zaya ops into other libraries' models (transformers)."""
