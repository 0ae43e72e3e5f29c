"""A layer of the zygote's confinement that this kernel or this setup refuses (sandbox/isolation.py).

The report itself (which layers, in which order, and why one was skipped) is part of the zygote's hello
message, so its home is the wire contract: `deadend.wire.Layer`, `LAYERS`, `layers_to_wire`.
"""

from __future__ import annotations


class Skipped(Exception):
    """A layer this kernel or this setup does not allow; the message says why, in a few words."""
