"""Helpers shared by test modules (tests/conftest.py puts this folder on sys.path)."""


def byte_tokenizer():
    """A 257-token byte-level tokenizer (no merges): exact round trip, builds in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def load_script(name: str):
    """Import ``benchmarks/NAME.py`` (a script, not a package module) for its functions."""
    import importlib.util
    import os
    import sys

    folder = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    if folder not in sys.path:  # as when the script runs: its sibling modules import
        sys.path.append(folder)
    path = os.path.join(folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
