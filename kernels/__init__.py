"""Triton kernels of solo_fast, installed as solo_fast.kernels; one file per op."""
