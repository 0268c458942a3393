"""The compiler service: hardware checkpoint in, program out, over gRPC (DESIGN §3)."""
