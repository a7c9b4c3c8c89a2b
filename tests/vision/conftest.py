"""One CPU thread for the vision models: their small convolutions gain nothing from a second
thread, and with another process on the machine torch's thread pool slowed this directory
from 22 s to 518 s (measured on the project's 2-core machine)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
