"""`python -m services.backfill ...` is `mdp backfill ...` (a command, not a long-running service)."""

import sys

from common.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["backfill", *sys.argv[1:]]))
