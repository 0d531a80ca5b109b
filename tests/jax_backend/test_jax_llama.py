"""Llama-style blocks on JAX (bodies: `tests/llama_tests.py`)."""

from llama_tests import *  # noqa: F401,F403
