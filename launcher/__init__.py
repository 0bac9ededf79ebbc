"""Slipstream's launcher: config, topology, effective batch, data, train loop, metrics, export."""
