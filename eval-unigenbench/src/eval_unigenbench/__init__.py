"""eval-unigenbench: UniGenBench evaluation of generated images by a judge model (served by vLLM)."""

__version__ = "0.1.0"
