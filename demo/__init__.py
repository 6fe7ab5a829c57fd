"""The offline demo: teach the embedded SmolLM2 its new name, ship it as a GGUF, measure it, chat with it."""
