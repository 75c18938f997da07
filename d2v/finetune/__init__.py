"""Fine-tuning and evaluation of pretrained d2v encoders (README, fine-tuning): CTC speech
recognition, image and text classification (linear probe and full fine-tuning), GLUE, and the
pretrained-versus-random evaluation behind `make eval`.
"""

# Tasks in modules of their own register on import (d2v.finetune.tasks.TASKS).
from d2v.finetune import asr, glue, image_task  # noqa: E402,F401
