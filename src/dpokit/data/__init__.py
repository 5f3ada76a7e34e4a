"""Data: files -> records (formats) -> token ids (tokenize) -> batches (collate), counted at every stage."""
