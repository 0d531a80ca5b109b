"""Llama-style blocks on TensorFlow (bodies: `tests/llama_tests.py`)."""

from llama_tests import *  # noqa: F401,F403
