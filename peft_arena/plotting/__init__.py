"""Shared look of every figure the arena draws (one method-colour legend for all plots)."""
