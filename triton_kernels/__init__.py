"""spinquant_kernels: the format spec, Hadamard matrices and the Triton kernels.

Imports only torch and triton. Installed under the import name
``spinquant_kernels`` (the folder is ``triton_kernels/``): vLLM would load a
top-level ``triton_kernels`` package in place of its own.
"""
