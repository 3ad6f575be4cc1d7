"""Many prefixes, one frozen model, mixed batches over HTTP: the bank of folded prefixes, the
scheduler and the app."""
