"""The `data-prep` command line: corpora -> tokenizer -> Megatron token shards (see cli.py)."""
