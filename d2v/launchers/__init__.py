"""The launchers' entry points. From a checkout, `launchers/pretrain.py` and `launchers/finetune.py`
run them; where d2v is installed, `python -m d2v.launchers.pretrain` (one process) or
`deepspeed --module d2v.launchers.pretrain ...` run the same code from any directory."""
