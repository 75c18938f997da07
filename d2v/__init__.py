"""d2v: data2vec pretraining on DeepSpeed (speech, vision, text)."""
__version__ = "0.1.0"
