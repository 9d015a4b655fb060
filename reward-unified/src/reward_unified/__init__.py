"""reward-unified: per-image rewards from UnifiedReward-Think's pairwise verdicts (served by vLLM)."""

__version__ = "0.1.0"
