"""Triton kernels (GPU; CPU via TRITON_INTERPRET=1), installed as seme.kernels."""
