"""spinquant_server: an OpenAI-compatible FastAPI server over vLLM or a CPU reference engine."""
