"""Kernels for XLA:CPU: the forms of convolutions, products and the stem's max pool whose
gradients XLA:CPU runs fast. The model reaches them only through modeling/conv.py, under
`model.conv_impl="cpu"` (the default on the CPU backend); docs/cpu_performance.md has the
measurements."""
