"""Generation backends, one per file: transformers (always), vLLM's engine, an OpenAI-compatible vLLM server."""
