"""Conformance: prove, per model family, that prefixtune's prefixes do what the paper's mean.

`suite.run_suite(model)` runs checks (1)-(5) (see `suite`) on any model against references
computed by transformers itself; `tiny.build_tiny(model_type)` builds a tiny random model of any
model type from its config class's defaults; `matrix.run_matrix()` runs the suite on every text
causal-LM and seq2seq family of the installed transformers (`prefixtune models`).
"""
