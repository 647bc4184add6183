"""CI's core check: after the README's first command, the core install has neither torch
nor llama.cpp, and ranking the default example imports neither (issue 27)."""

import importlib.util
import runpy
import sys

installed = [m for m in ("torch", "llama_cpp", "transformers") if importlib.util.find_spec(m) is not None]
assert not installed, f"the core install brought {installed}"
sys.argv = ["edgerank"]
try:
    runpy.run_module("edgerank", run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), f"python -m edgerank exited {e.code}"
loaded = [m for m in ("torch", "llama_cpp", "transformers") if m in sys.modules]
assert not loaded, f"ranking the example imported {loaded}"
print("core check: the example ranked on the core install; torch and llama_cpp neither installed nor imported")
