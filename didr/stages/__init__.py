"""The six pipeline stages, each runnable alone: teacher, warmup, align, sample, score, report."""
