"""Subcommands of `mdp` beyond the built-in ones, one module each.

A module here defines `register(subparsers) -> None`, which adds its parser and sets `func` to a callable
taking the parsed `argparse.Namespace` and returning an exit code (or an awaitable of one). `common.cli`
finds every module in this package by itself.
"""
