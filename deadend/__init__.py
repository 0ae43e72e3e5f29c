"""deadend: a honeypot and tarpit daemon whose services are untrusted, sandboxed Lua scripts."""

__version__ = "0.2.0"
