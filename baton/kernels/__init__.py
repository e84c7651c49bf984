"""Triton kernels and the plain-torch references they must equal, behind one facade.

Callers use `baton.kernels.ops`; it picks Triton for CUDA tensors and the reference
elsewhere, so the engine never branches on the device. Imports nothing else of `baton`.
"""
