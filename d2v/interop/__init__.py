"""Interop with transformers and fairseq: HF export, --init-from, fairseq import (README, interop).

Importing this package pulls in neither transformers nor fairseq: export writes plain JSON and
safetensors, and every weight file is read through d2v.safe_load (no code in a file runs).
"""
from d2v.interop.fairseq_import import import_fairseq
from d2v.interop.hf_export import write_hf
from d2v.interop.init_from import InitReport, init_from, pretrained_config, read_pretrained

__all__ = ["InitReport", "import_fairseq", "init_from", "pretrained_config", "read_pretrained", "write_hf"]
