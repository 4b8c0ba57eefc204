"""The gRPC edge: the only code that uses grpc and the generated messages."""
