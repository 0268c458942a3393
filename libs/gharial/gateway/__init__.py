"""The websocket gateway (DESIGN §1): `GET /asr/v0.1/stream` for clients, one gRPC Transcribe call
per stream to a card worker chosen by the load balancer.

One concept per module: `params` (query parameters), `framing` (60 ms frames), `closing` (error
Close frames), `auth` (API keys), `workers` (choosing a worker), `channels` (gRPC channels), `relay`
(one stream ↔ one call, replayed on another worker when one fails), `messages` (the JSON responses),
`session` (the websocket endpoint), `settings`, `metrics`, and `app` (the FastAPI app).
"""
