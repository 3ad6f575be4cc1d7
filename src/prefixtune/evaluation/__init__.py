"""Decoding a split with a trained method, and pure metric functions (the official E2E
protocol re-implemented, WebNLG seen/unseen, ROUGE)."""
