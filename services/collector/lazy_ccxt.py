"""Import ccxt without importing every exchange it ships: the collector uses one, ccxt's packages load ~110.

`import ccxt.pro` runs the `__init__` of three packages (`ccxt`, `ccxt.async_support`, `ccxt.pro`), each of
which imports all of its exchange modules: 109 MB resident before a single market is loaded, most of the
collector's memory (docs/collector.md, "Batching and memory"). Importing this module first installs a loader
for those three `__init__`s that leaves out their `from ccxt.<pkg>.<id> import <id>` lines and makes the
package import an exchange on first use (`ccxt.pro.binance`, `getattr(ccxt.pro, "binance")`,
`from ccxt.pro import binance` all work as before). Everything else in the `__init__`s (errors, `Exchange`,
`exchanges`, `__version__`) runs unchanged. Measured: the collector's imports 120 -> 66 MB.

It must run before the process first imports ccxt; once ccxt is imported (a test process, a tool) it changes
nothing. If a ccxt release writes its `__init__` differently, no line matches and ccxt loads as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys
from collections.abc import Sequence
from types import CodeType, ModuleType

PACKAGES = frozenset({"ccxt", "ccxt.async_support", "ccxt.pro"})
# `from ccxt.pro.binance import binance` (and a trailing comment): an exchange module importing its own class.
EXCHANGE_IMPORT = re.compile(r"^from (ccxt(?:\.async_support|\.pro)?)\.(\w+) import (\w+)[ \t]*(#.*)?$",
                             re.MULTILINE)
ON_FIRST_USE = '''

import sys as _sys
import types as _types


class _ExchangesOnFirstUse(_types.ModuleType):
    """An exchange class is imported on first use (services/collector/lazy_ccxt.py). The import system binds
    a submodule to its package (`ccxt.pro.binance` = the module); ccxt relies on the name being the class
    (`import ccxt.async_support.binanceusdm as rest; rest()`), as its eager __init__ leaves it: so is it here."""

    def __getattr__(self, name):
        if name not in exchanges:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        import importlib
        module = importlib.import_module(f"{self.__name__}.{name}")
        cls = getattr(module, name)
        _types.ModuleType.__setattr__(self, name, cls)
        return cls

    def __setattr__(self, name, value):
        if name in exchanges and isinstance(value, _types.ModuleType):
            value = getattr(value, name, value)
        _types.ModuleType.__setattr__(self, name, value)


_sys.modules[__name__].__class__ = _ExchangesOnFirstUse
'''


def lazy_source(source: str) -> str:
    """A ccxt package `__init__` without its exchange imports, plus the `__getattr__` that imports them."""
    stripped, n = EXCHANGE_IMPORT.subn(lambda m: "" if m.group(2) == m.group(3) else m.group(0), source)
    return stripped + ON_FIRST_USE if n else source


class _Loader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> CodeType:
        source = self.get_data(self.get_filename(fullname)).decode("utf-8")
        return compile(lazy_source(source), self.get_filename(fullname), "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return spec
        spec.loader = _Loader(fullname, spec.origin)
        return spec


def install() -> None:
    """Put the loader first on sys.meta_path (once), unless ccxt is already imported."""
    if "ccxt" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


install()
