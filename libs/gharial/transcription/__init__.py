"""The transcriber's logic (DESIGN §1): streaming transcription behind `gharial.v1.Transcriber`.

One concept per module: `transcript` (final deltas, provisional tails, alternatives), `session`
(one stream: audio in, one response per 60 ms frame), `backend` (what runs the model, as seen by a
session), `cpu` and `accelerator` (the two backends), `license_check` (may the card run the
program?), `service` (the gRPC servicer: admission, calls, draining) and `metrics`.
"""
