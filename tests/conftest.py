import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

# Tiny models: one thread is faster than several (thread start-up dominates), and steadier on shared CPUs.
torch.set_num_threads(1)
