"""Fine-tuning and evaluation of pretrained d2v encoders (issue 10, items 4-7): CTC speech
recognition, image and text classification (linear probe and full fine-tuning), and the
pretrained-versus-random evaluation behind `make eval`.
"""
