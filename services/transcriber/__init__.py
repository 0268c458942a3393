"""The transcriber service: one per card worker, streams in, transcripts out, over gRPC (DESIGN §1)."""
