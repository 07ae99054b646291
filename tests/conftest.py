"""Test-session settings. The tests use tiny tensors on a small shared CPU, where more than one torch thread only adds
contention (a tiny forward/backward took 4 s with 2 threads and 0.08 s with 1 on the 2-core CI machine)."""

import torch

torch.set_num_threads(1)
