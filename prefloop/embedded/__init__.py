"""The embedded default: a procedurally generated arithmetic task, a tiny Llama built from a config
and a locally trained character tokenizer (no downloads)."""
