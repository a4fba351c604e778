"""accum: exact, automatic gradient accumulation for Hugging Face Accelerate."""

__version__ = "0.1.0"
