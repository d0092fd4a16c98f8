"""CLIP model library (model, configs, tokenizer, loss, transforms, shard loader, evaluation) and trainer entry points.

Entry points: `clip_train.train.main(argv)` (clipline train) and `clip_train.evaluate.main(argv)` (clipline eval).
"""
