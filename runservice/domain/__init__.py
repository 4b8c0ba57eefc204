"""The domain: runs, events and errors, with no knowledge of gRPC, protobuf or SQL."""
