"""Test-session set-up: with pytest-xdist (``-n 2``) every worker and the processes it launches
compute on one thread, so that two workers share the two cores instead of oversubscribing them."""
import os

import torch

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
