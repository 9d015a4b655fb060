"""reward-ocr: scores how accurately generated images render the text quoted in their prompts."""

__version__ = "0.1.0"
