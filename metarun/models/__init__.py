"""Backbones: input -> features. Heads belong to algorithms, so one backbone serves every algorithm."""
