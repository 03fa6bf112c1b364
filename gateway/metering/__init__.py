"""What a call used: bytes, every token kind from JSON and SSE, offline token counting."""
