"""Answer extraction and scoring, one module per scorer family (reference libraries wherever they exist)."""
