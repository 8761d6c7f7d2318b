"""Train and evaluate SAN: `python train.py --help` lists the flags; see README.md."""

import sys

from san_fast import ops
from san_fast.config import build_parser, resolve
from san_fast.engine import run
from san_fast.runtime import resolve_device


def main(argv=None) -> None:
    parser = build_parser()
    try:
        cfg = resolve(vars(parser.parse_args(argv)))
        # Checked before any data is read, so a wrong device or kernel choice fails at once.
        ops.check_impl(cfg.seat_impl, resolve_device(cfg.device))
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    try:
        run(cfg)
    except FileNotFoundError as exc:  # a dataset missing or laid out differently than expected
        sys.exit(f"train.py: error: {exc}")


if __name__ == "__main__":
    main()
