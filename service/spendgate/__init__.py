"""spendgate: policy-as-code budget enforcement for AI inference."""

__version__ = "0.1.0"
