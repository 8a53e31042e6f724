"""E-PMQ: expert-guided post-merge quantization with merged-weight anchoring (arXiv 2605.16882)."""

__version__ = "0.1.0"
