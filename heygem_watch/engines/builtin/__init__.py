"""The built-in engine, one module per stage:

    speech.py   recording audio -> wanted mouth over time (openness, width, closure)
    mouth.py    template frames -> mouth library (descriptors, teeth, sharpness) + Viterbi selector
    compose.py  selected frame's lips warped onto the current frame (mesh warp, colour match, feathered mask)
    engine.py   BuiltinEngine: the Engine interface (engines/base.py) over the three

The engine class is imported lazily so that a stage module (speech analysis in particular) costs only its own
imports.
"""
from __future__ import annotations

__all__ = ["BuiltinEngine"]


def __getattr__(name: str):
    if name == "BuiltinEngine":
        from heygem_watch.engines.builtin.engine import BuiltinEngine

        return BuiltinEngine
    raise AttributeError(name)
