"""Triton kernels (backend layer). Imports nothing from sparsebert."""
