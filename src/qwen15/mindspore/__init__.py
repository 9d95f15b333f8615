"""MindSpore/MindFormers files in plain Python (no MindSpore import): .ckpt checkpoints in and out, per-rank
checkpoints merged with their strategy files, MindFormers names and fused layouts, MindRecord datasets.

See docs/migrate.md.
"""
