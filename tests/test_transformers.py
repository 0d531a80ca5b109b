"""The transformer units and blocks on TensorFlow (bodies: `tests/transformer_tests.py`,
`tests/around_blocks_tests.py`)."""

from around_blocks_tests import *  # noqa: F401,F403
from transformer_tests import *  # noqa: F401,F403
