"""attune: fine-tune open LLMs on Ray Train, search with Ray Tune, serve with Ray Serve + vLLM."""

__version__ = "0.1.0"
