"""Train and evaluate SAN: `python train.py --help` lists the flags; see README.md.

Multi-GPU: `torchrun --nproc_per_node K train.py ...` (README, section Training).
"""

import sys

from san_fast import ops
from san_fast.config import build_parser, resolve
from san_fast.distributed import launch_env
from san_fast.runtime import resolve_device

# Errors a user can cause and fix (flags, data files, the run folder, a checkpoint, divergence,
# the file system): one line and exit code 2. Anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, OSError, FloatingPointError)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(vars(args))
        # Checked before any data is read, so a wrong device or kernel choice fails at once.
        ops.check_impl(cfg.seat_impl, resolve_device(cfg.device))
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    from san_fast.engine import run  # after the flags are checked: a bad flag fails fast

    try:
        run(cfg)
    except EXPECTED as exc:
        rank, _, world = launch_env()
        where = f" (rank {rank})" if world > 1 else ""
        print(f"train.py: error{where}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
