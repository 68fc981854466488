"""Writing results: CSV/JSON artifacts, rich console tables and TensorBoard items."""
