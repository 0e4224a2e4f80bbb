"""Calculators for simulation engines: ASE (`ase.py`) and jax-md (`jaxmd.py`)."""
