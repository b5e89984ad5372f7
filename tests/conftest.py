"""Suite-wide settings."""

import torch

# One intra-op thread: the suite's tensors are tiny, and on a 2-core machine OpenMP spin-waits made tiny nets
# 10-100x slower under load.
torch.set_num_threads(1)
