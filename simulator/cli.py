"""`mdp simulate [...]`: the simulator's command, added to `mdp` through the `mdp.commands` entry point
(pyproject.toml), so the pipeline's own packages never import the simulator."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="run the exchange simulator (same options as python -m simulator)",
                       add_help=False)
    p.set_defaults(func=_run, passthrough=True)


def _run(args: argparse.Namespace, rest: list[str]) -> int:
    from simulator.__main__ import main

    return int(main(rest) or 0)
