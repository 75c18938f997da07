"""The EMA teacher (docs/method.md §3.1 step 5, §4): the one module that owns the teacher's
copy, its decay schedule, its update under every ZeRO stage, its placement and its checkpoint form.
"""
from d2v.teacher.core import Teacher
from d2v.teacher.schedule import ema_decay

__all__ = ["Teacher", "ema_decay"]
