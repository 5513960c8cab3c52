"""CSSFE: Category-Specific Selective Feature Enhancement for long-tailed multi-label classification."""
__version__ = "0.1.0"
