"""The plain training loop: trainer, checkpoints, distributed data parallel and the
frozen-weight cast."""
