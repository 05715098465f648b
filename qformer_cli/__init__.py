"""qformer: train, evaluate and export BLIP-2 Q-Formers."""

import os

# OpenMP threads that busy-wait make every op wait for a descheduled sibling when anything else
# runs on the machine: measured here on 2 cores with one other busy process, a tiny stage-1 step
# took 15 s with the default policy and 0.6 s with PASSIVE. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
