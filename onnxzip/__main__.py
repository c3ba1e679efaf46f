"""``python -m onnxzip ...``: the same as the ``onnxzip`` command."""
import sys

from onnxzip.cli import main

sys.exit(main())
