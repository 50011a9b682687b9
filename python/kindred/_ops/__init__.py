"""torch attached to the core: one module per op family holding its ``kindred::*`` custom ops (registered
on import), and ``adapter`` (TensorViews of torch tensors and numpy arrays, the current CUDA stream)."""
