"""GPU kernels (Triton) registered as torch custom ops, each with a pure-PyTorch reference."""
