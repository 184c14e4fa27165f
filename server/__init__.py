"""The µLM gRPC server (`python -m server`).

__main__ (flags, signals) -> app (grpc.aio server, health, reflection, status-code interceptor) -> services/*
(each registers itself; generation: scheduler -> backends/* and detokenize). metrics and errors are shared.
"""
