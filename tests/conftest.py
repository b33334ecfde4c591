import os
import sys
from pathlib import Path

# tests never reach a model hub; everything is built locally or shipped in packages
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
