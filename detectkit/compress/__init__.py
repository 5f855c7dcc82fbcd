"""Compression algorithms without Lightning: pruning (torch-pruning), INT8 quantization (modelopt).

The Lightning callbacks in ``detectkit.callbacks`` schedule them; ``detectkit.checkpoint`` replays
the architecture ops they record.
"""
