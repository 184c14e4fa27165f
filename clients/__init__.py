"""µLM command-line client: talks to a server over gRPC only (the stubs are in protos/)."""
