"""The data side: sources -> tokenizer -> verified shards -> a mixed, packed, resumable loader."""
