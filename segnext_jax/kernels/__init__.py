"""Native kernels: C++ called from XLA through its FFI, for operations XLA compiles poorly on some backend.

- `depthwise`: depth-wise convolution and its weight gradient on CPU (models.depthwise's 'native' implementation).
- `build`: compiles the C++ sources on first use and caches the libraries per machine.
"""
