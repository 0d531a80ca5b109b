"""`python -m keras_blpa.build_ops`: build the op library and print where.

The command line lives here, not in `keras_blpa/build_ops/__init__.py`: importing
`keras_blpa` already imports `build_ops` (layers -> backend.tensorflow.kernels -> build_ops), and
runpy warns when `-m` runs a module that is already imported (it would run a
second copy of it as `__main__`). This module is imported by nothing else.
"""

import sys

from keras_blpa.build_ops import main

sys.exit(main())
