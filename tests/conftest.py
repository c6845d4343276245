"""Imported by pytest before any test module: attnquant's import decides between Triton's
interpreter (no GPU) and its compiler, and that has to happen before anything imports
triton.language, whose own @triton.jit helpers (tl.cdiv, ...) are bound at that import."""

import importlib

importlib.import_module("attnquant")
