"""Drop-in adapters for the tools agents already use (optional extras: `pip install retrieval-head[langchain]`)."""
