"""Train and evaluate SAN: `python train.py --help` lists the flags; see README.md.

Multi-GPU: `torchrun --nproc_per_node K train.py ...` (README, section Training).
"""

import sys

from san_fast import ops
from san_fast.config import build_parser, resolve
from san_fast.runtime import resolve_device


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(vars(args))
        # Checked before any data is read, so a wrong device or kernel choice fails at once.
        ops.check_impl(cfg.seat_impl, resolve_device(cfg.device), cfg.semantics())
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    # after the flags are checked: a bad flag fails fast
    from san_fast.engine import run
    from san_fast.report import EXPECTED, print_error

    try:
        run(cfg)
    except EXPECTED as exc:
        sys.exit(print_error("train.py", exc))


if __name__ == "__main__":
    main()
