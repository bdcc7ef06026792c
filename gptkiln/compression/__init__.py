"""Smaller models from a checkpoint (`gptkiln compress`): structured pruning by importance measured on
calibration text, knowledge distillation from the unpruned model, and the same kind of gate every build gets.

importance.py measures, structure.py removes (blocks, MLP channels, whole GQA groups), distill.py trains the
pruned student on the teacher's logits, run.py puts them together and writes a standard checkpoint.
"""
