"""What every Gharial service process shares: structured logs, the gRPC server with health checking
and Prometheus metrics, and graceful shutdown on SIGTERM."""
