"""The µLM gRPC server (`python -m server`).

__main__ (flags, signals) -> app (grpc.aio server, health, reflection, status-code interceptor) -> services/*
(each registers itself). Generation: engine -> scheduler (token ids) -> model_runner -> backends/*; the service's
generate_request parses, text_output (with detokenize) makes text. metrics and errors are shared.
"""
