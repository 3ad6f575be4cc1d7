"""Dataset readers (one module per dataset), the built-in toy set, and tokenisation into
training examples and batches."""
