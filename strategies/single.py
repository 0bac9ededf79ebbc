"""One process, one device: the protocol's defaults, nothing to sync."""
from strategies.base import Strategy


class SingleDevice(Strategy):
    pass
