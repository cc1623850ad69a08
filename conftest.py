"""Repository-wide pytest set-up: notebooks (run through nbmake) use their quick settings."""

import os

os.environ.setdefault("STREAMLENS_QUICK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
