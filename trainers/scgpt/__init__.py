"""scGPT-compatible model, tokenization, Lightning module, evaluation."""
