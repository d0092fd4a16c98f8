"""CLIP model library (model, configs, tokenizer, loss, transforms, shard loader, evaluation) and trainer entry points.

Entry points: `clip_train.train.main(argv)` (clipline train) and `clip_train.evaluate.main(argv)` (clipline eval).
Interop with the CLIP ecosystem: `clip_train.interop` (OpenAI / open_clip checkpoints in, open_clip export out),
`clip_train.benchmark_wds` (CLIP_benchmark's webdataset evaluation layout). Curation on the training side:
`clip_train.online_balance` (MetaCLIP's per-epoch draw) and `clip_train.clip_score` (CLIP-score filtering).
"""
