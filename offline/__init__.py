"""spinquant_offline: learn rotations, quantize weights, write and evaluate checkpoints.

Never imports vLLM.
"""
