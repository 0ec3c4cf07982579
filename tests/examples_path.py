"""Put ``examples/`` on ``sys.path`` so the example tests can import ``gsdnet`` and ``train_gsdnet``."""

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
