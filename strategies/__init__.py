"""Distributed strategies behind one protocol (strategies.base.Strategy)."""
from strategies.base import Strategy, build_strategy

__all__ = ["Strategy", "build_strategy"]
