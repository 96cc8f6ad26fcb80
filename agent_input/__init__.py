"""openai-elastic collector: polls OpenAI organization Admin APIs and emits ECS events."""

__version__ = "0.1.0"
