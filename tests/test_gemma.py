"""Gemma's decoder block on TensorFlow (bodies: `tests/gemma_tests.py`)."""

from gemma_tests import *  # noqa: F401,F403
