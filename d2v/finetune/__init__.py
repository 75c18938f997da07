"""Fine-tuning and evaluation of pretrained d2v encoders (README, fine-tuning): CTC speech
recognition, image and text classification (linear probe and full fine-tuning), and the
pretrained-versus-random evaluation behind `make eval`.
"""

# Downstream tasks in modules of their own register (d2v.finetune.tasks.TASKS) when the package loads.
from d2v.finetune import image_task  # noqa: E402,F401
