"""The bundled tiny dLLM: synthetic tasks, tokenizer, training and evaluation."""
