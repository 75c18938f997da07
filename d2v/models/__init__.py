"""Model code, written for one device: no deepspeed, no torch.distributed (docs/method.md §2)."""
from d2v.models.audio import Features
from d2v.models.blocks import BlockOutput
from d2v.models.data2vec import Data2Vec
from d2v.models.factory import build_model

__all__ = ["BlockOutput", "Data2Vec", "Features", "build_model"]
