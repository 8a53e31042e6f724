import os

import pytest
import torch

# Tests never reach a hub: every model is built from a small config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tests run tiny models: with several threads, intra-op synchronisation costs more than the work
# (tens of times more on a busy 2-core machine), and pytest-xdist already runs one worker per core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
