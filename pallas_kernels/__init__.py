"""Pallas kernels (TPU Mosaic / GPU Triton) for quantized and block-sparse matmuls.

Imports only jax. Empty until the kernels land; `jaxcomp.quant.dot.int_dot` is where they plug
in, and its XLA path is what runs everywhere today.
"""
