"""µLM clients: generated gRPC stubs (clients.api) and the `python -m clients` command line."""
