"""The HTTP face of the server: the same services as JSON over HTTP/1.1 (FastAPI on uvicorn, on the gRPC server's
event loop), the native REST API under /ulm/v1, the OpenAI-compatible API under /v1, Server-Sent Events for streams.

Every route calls the very servicer method the gRPC server calls (server/http/calls.py), with an HttpContext in
place of grpc.aio.ServicerContext (server/http/context.py); nothing is implemented twice.
"""
