"""Benchmark cases, one module per family; importing this package imports (and so registers) every module here."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
