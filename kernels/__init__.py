"""Slipstream's model core and its fused ops (Triton, with pure-PyTorch twins)."""
