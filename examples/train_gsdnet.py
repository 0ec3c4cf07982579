"""Train GSDNet (or the Table 2 ablation variants) on a facial-expression dataset.

Defaults follow the reference recipe for RAF-DB: timm ResNet50, Adam lr 1e-4 and weight decay
1e-4, learning rate x0.9 per epoch, 40 epochs, batch 64, 224 x 224 input, T = 3, KL 0.3,
feature 0.01 in the reference formulation, no cross-entropy on the auxiliary heads (the loss
flags change these). ``--as-shipped`` trains what the authors' code trains, quirks included.
``--val-fraction`` and ``--seeds`` give the honest protocol: the epoch is picked on a validation
split carved from the training set, and mean +- std over seeds is reported next to the paper's
protocol (best epoch on the test set, optimistic). ``--dataset digits`` is a small stand-in that
ships with scikit-learn (no download); it uses its own small preset and is not a
facial-expression result.

    python examples/train_gsdnet.py --dataset digits --method all
    python examples/train_gsdnet.py --dataset rafdb --data-dir RAF-DB/basic \\
        --weights vgg_msceleb_resnet50_ft_weight.pkl --val-fraction 0.1 --seeds 0 1 2
    torchrun --nproc_per_node 4 examples/train_gsdnet.py --dataset ferplus --data-dir FERPlus ...

From Python, ``main(argv)`` returns the run's metrics dict; with several methods or seeds,
``{"runs": {method: [metrics per seed]}, "comparison": path of comparison.md}``. The flags are in
``gsdnet/cli.py``, which turns them into a ``RunConfig`` (``gsdnet/config.py``); each run's steps
(prepare data, build, train, select, report) are in ``gsdnet/runner.py``.
"""

from __future__ import annotations

import sys

from gsdnet.cli import parse_args
from gsdnet.runner import run

__all__ = ["main", "parse_args"]


def main(argv: list[str] | None = None) -> dict:
    """Run the command ``argv`` (default ``sys.argv[1:]``); return its metrics."""
    return run(parse_args(argv))


# Errors a user can act on (data, checkpoint, settings, divergence, a stalled process: a
# TimeoutError): one message, the traceback only with --debug. Not RuntimeError: out of memory, a
# CUDA failure or a bug keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)

if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as error:
        if "--debug" in sys.argv:
            raise
        print(f"error: {error} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
