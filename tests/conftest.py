"""Suite-wide settings."""

import torch

# One intra-op thread per test process: CI runs two xdist workers on two cores, and with torch's default
# threads per worker the idle threads spin while others hold the cores (a tiny fit took 35 s instead of 4).
torch.set_num_threads(1)
