"""Hydra config groups, shipped as package data so an installed `metarun` finds them anywhere."""
