"""Frame-synchronous RNN-T decoders: each advances many streams by one 60 ms encoder frame per call."""
