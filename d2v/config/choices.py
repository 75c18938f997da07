"""The values each choice setting of the config takes."""

# The values a choice setting takes: validate.py checks them, and each module that implements a
# choice dispatches over the same names (a test holds its registry to this list).
CHOICES: dict[str, tuple] = {
    "model.head": ("linear", "mlp"),
    "teacher.tap": ("ffn", "block"),
    "teacher.input": ("features", "source"),
    "teacher.offload": ("none", "cpu"),
    "teacher.layer_norm": ("instance", "layer", None),
    "teacher.final_norm": ("instance", "layer", None),
    "loss.kind": ("l2", "smooth_l1"),
    "loss.reduction": ("sum_per_position", "mean"),
    "optim.schedule": ("tri_stage", "cosine", "constant", "polynomial"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.wandb": ("disabled", "offline", "online"),
}
