"""mmgrad's tools: ``verify`` (every backend against the oracle), ``bench`` (kernel tables),
``bench_step`` (the end-to-end step and memory) and ``demo`` (the real-data comparison).
Run them as ``python -m mmgrad {verify,bench,demo}`` or ``python -m mmgrad.bench_step``."""
