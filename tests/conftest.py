import os

# Tests run on the CPU (Pallas kernels in interpret mode), even when libtpu is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
