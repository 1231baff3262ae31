"""mmgrad's tools: ``verify`` (every backend against the oracle), ``bench`` (kernel tables),
``bench_step`` (the end-to-end step and memory) and ``demo`` (the real-data comparison).
Run them as ``python -m mmgrad {verify,bench,demo}`` or ``python -m mmgrad bench-step``."""


def describe(doc: str) -> str:
    """A command's --help description: its module docstring's first paragraph, without rST quotes."""
    return doc.split("\n\n")[0].replace("``", "")
