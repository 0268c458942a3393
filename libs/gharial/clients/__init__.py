"""Client programs that drive a running gateway (the performance client)."""
