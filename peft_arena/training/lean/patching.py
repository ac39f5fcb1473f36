"""Replacing methods of peft's classes with the lean ones, and putting peft's back (tests).

Each lean module names its replacements as ``{key: (class, attribute, new)}``; :func:`patch` keeps peft's own
callable under ``key`` in the module's ``originals`` (the lean code falls back to it) the first time, and
:func:`restore` puts peft's attribute back exactly as peft defined it (a staticmethod stays one; an inherited
attribute is inherited again).
"""

from __future__ import annotations

_INHERITED = object()
_PEFT: dict[tuple[type, str], object] = {}  # peft's class attributes as defined, kept the first time


def patch(originals: dict, replacements: dict[str, tuple[type, str, object]]) -> None:
    """Install ``replacements`` (idempotent); ``originals[key]`` is peft's callable."""
    for key, (cls, attr, new) in replacements.items():
        if (cls, attr) not in _PEFT:
            _PEFT[cls, attr] = cls.__dict__.get(attr, _INHERITED)
            originals[key] = getattr(cls, attr)
        setattr(cls, attr, new)


def restore(replacements: dict[str, tuple[type, str, object]]) -> None:
    """peft's attributes back, where :func:`patch` replaced them."""
    for cls, attr, _ in replacements.values():
        peft = _PEFT.get((cls, attr))
        if peft is _INHERITED:
            if attr in cls.__dict__:
                delattr(cls, attr)
        elif peft is not None:
            setattr(cls, attr, peft)
