"""Training: config tree, packed-sequence data, DeepSpeed loop, tracking, export.

The model code knows nothing about DeepSpeed; everything DeepSpeed-specific lives
in `trainer.py`. `launchers/pretrain.py` is the thin front door.
"""
