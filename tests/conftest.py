import os

# No test may reach the hub: the tiny model is built in memory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
