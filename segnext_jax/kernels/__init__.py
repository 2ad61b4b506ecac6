"""Native kernels: C++ called from XLA through its FFI, for operations XLA compiles poorly on some backend.

- `depthwise`: depth-wise convolution and its weight gradient on CPU (models.depthwise's 'native' implementation).
- `cross_entropy`: the training loss's bilinear upsampling and cross-entropy, and its gradient, on CPU.
- `fusion_barrier`: an identity XLA:CPU cannot fuse across, for the gradient of the blocks' residual stream.
- `build`: compiles the C++ sources on first use, caches the libraries per machine and registers them with XLA.
- `partitioning`: runs a kernel on each device's part of the batch under a batch-sharded jit.
"""
